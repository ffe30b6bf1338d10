"""Model layer: pad token distinct from EOS, vocabulary checks (padded embeddings), LoRA targets,
the offline message for unknown models."""
from __future__ import annotations

import pytest

from minillm_cli.errors import InputError


def test_pad_added_when_missing(tmp_path):
    """A GPT-2-style tokenizer (EOS only, pad = EOS or none) gets a new, distinct pad token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from minillm_cli.models import PAD_TOKEN, load_tokenizer

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(["hello world"] * 5, trainers.BpeTrainer(vocab_size=280, special_tokens=["<|endoftext|>"],
                                                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    for pad in (None, "<|endoftext|>"):
        raw = PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<|endoftext|>", unk_token="<|endoftext|>", pad_token=pad)
        raw.save_pretrained(str(tmp_path / "t"))
        tok = load_tokenizer(str(tmp_path / "t"))
        assert tok.pad_token == PAD_TOKEN and tok.pad_token_id != tok.eos_token_id
        assert len(tok) == len(raw) + 1 and tok.pad_token_id == len(raw)


def test_vocabulary_check(tmp_path, tiny_dir):
    from minillm_cli.models import check_same_tokenizer, load_tokenizer
    from minillm_cli.toy.tiny import train_bpe_tokenizer

    a = load_tokenizer(str(tiny_dir / "student"))
    assert check_same_tokenizer(a, load_tokenizer(str(tiny_dir / "teacher"))) == len(a)
    other = train_bpe_tokenizer(["completely different text zzz qqq"] * 5, tmp_path / "o", vocab_size=300)
    with pytest.raises(InputError, match="tokenizers differ.*teacher has"):
        check_same_tokenizer(other, a)


def test_padded_embedding_sizes_are_fine(tmp_path, tiny_dir):
    """A teacher whose embedding matrix is wider than its tokenizer (e.g. 152064 vs 151936) loads
    and is sliced to the tokenizer's length by the engine."""
    import torch
    from transformers import AutoModelForCausalLM

    from minillm_cli.engine.teacher import load_teacher
    from minillm_cli.models import load_tokenizer

    m = AutoModelForCausalLM.from_pretrained(str(tiny_dir / "teacher"))
    m.resize_token_embeddings(len(load_tokenizer(str(tiny_dir / "teacher"))) + 13)
    m.save_pretrained(str(tmp_path / "wide"))
    load_tokenizer(str(tiny_dir / "teacher")).save_pretrained(str(tmp_path / "wide"))
    tok = load_tokenizer(str(tiny_dir / "student"))
    teacher, vocab = load_teacher(str(tmp_path / "wide"), student_tokenizer=tok, device=torch.device("cpu"))
    assert vocab == len(tok)
    assert teacher.get_output_embeddings().weight.shape[0] == len(tok) + 13
    assert not any(p.requires_grad for p in teacher.parameters())


def test_unknown_model_offline_message(monkeypatch):
    from minillm_cli.models import load_tokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(InputError, match="Hub is unreachable.*local model folder"):
        load_tokenizer("no-such-org/no-such-model")


def test_lora_targets_detected(tiny_dir):
    import torch

    from minillm_cli.models import LoraSettings, count_parameters, load_model, load_tokenizer, lora_targets

    tok = load_tokenizer(str(tiny_dir / "student"))
    model = load_model(str(tiny_dir / "student"), tokenizer=tok, device=torch.device("cpu"),
                       lora=LoraSettings(r=4))
    assert lora_targets(model.base_model.model, None) == ["c_attn", "c_proj", "c_fc"]
    total, trainable = count_parameters(model)
    assert 0 < trainable < total
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)


def test_fused_gelu_same_function_fewer_saved_bytes_same_saved_folder(tmp_path, tiny_dir):
    """`load_model(fuse=True)` (the default on CUDA) runs GPT-2's gelu_new as one kernel: same
    logits, less saved for the backward (the composed form keeps several [tokens, 4 x width]
    intermediates per layer), and a saved folder identical in keys and config."""
    import json

    import torch

    from minillm_cli.models import load_model, load_tokenizer

    tok = load_tokenizer(str(tiny_dir / "teacher"))
    kw = dict(tokenizer=tok, device=torch.device("cpu"))
    plain = load_model(str(tiny_dir / "teacher"), **kw)
    fused = load_model(str(tiny_dir / "teacher"), fuse=True, **kw)
    names = lambda m: {type(x).__name__ for x in m.modules()}  # noqa: E731
    assert "NewGELUActivation" in names(plain) and "NewGELUActivation" not in names(fused)
    assert "FusedGELU" in names(fused)

    ids = torch.randint(0, len(tok) - 1, (2, 24))

    def run(model):
        saved = []

        def pack(t):
            saved.append(t.numel() * t.element_size())
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logits = model(input_ids=ids).logits
        logits.float().logsumexp(-1).sum().backward()
        return logits.detach(), sum(saved)

    a, saved_plain = run(plain)
    b, saved_fused = run(fused)
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    assert saved_fused < saved_plain, (saved_fused, saved_plain)

    fused.save_pretrained(str(tmp_path / "f"))
    plain.save_pretrained(str(tmp_path / "p"))
    cfg = lambda d: {k: v for k, v in json.loads((tmp_path / d / "config.json").read_text()).items()  # noqa: E731
                     if k != "transformers_version"}
    assert cfg("f") == cfg("p") and cfg("f")["activation_function"] == "gelu_new"
    from safetensors.torch import load_file
    assert load_file(str(tmp_path / "f" / "model.safetensors")).keys() == load_file(str(tmp_path / "p" / "model.safetensors")).keys()


@pytest.mark.parametrize("family", ["llama", "qwen2", "phi3", "phi", "starcoder2", "mpt", "gpt_neox", "opt"])
def test_lora_targets_cover_every_projection_of_the_blocks(family):
    """Detected LoRA targets adapt every linear layer of the transformer blocks (not the LM head),
    also for families that share only some of Llama's names: Phi-3 fuses q/k/v into qkv_proj and
    gate/up into gate_up_proj (Llama's list alone found o_proj and down_proj only), Phi-1/2 has
    dense/fc1/fc2 beside q/k/v_proj, StarCoder2 c_fc/c_proj, MPT Wqkv/out_proj."""
    import torch
    import transformers as T

    from minillm_cli.models import lora_targets

    small = dict(num_hidden_layers=1, hidden_size=16, intermediate_size=32, num_attention_heads=2, vocab_size=64,
                 bos_token_id=0, eos_token_id=0, pad_token_id=0)
    configs = {
        "llama": lambda: T.LlamaConfig(num_key_value_heads=1, **small),
        "qwen2": lambda: T.Qwen2Config(num_key_value_heads=1, **small),
        "phi3": lambda: T.Phi3Config(num_key_value_heads=1, **small),
        "phi": lambda: T.PhiConfig(**small),
        "starcoder2": lambda: T.Starcoder2Config(num_key_value_heads=1, **small),
        "mpt": lambda: T.MptConfig(n_layers=1, d_model=16, n_heads=2, vocab_size=64),
        "gpt_neox": lambda: T.GPTNeoXConfig(**small),
        "opt": lambda: T.OPTConfig(ffn_dim=32, word_embed_proj_dim=16, **{k: v for k, v in small.items()
                                                                           if k != "intermediate_size"}),
    }
    with torch.device("meta"):
        model = T.AutoModelForCausalLM.from_config(configs[family]())
    assert model.config.model_type == family
    linear = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(lora_targets(model, None)) == linear - {"lm_head"}


def test_lora_targets_named_must_each_name_a_module():
    """peft refuses --lora-targets only when none matches: a misspelt name beside a right one
    (`q_proj,v_porj`) left those modules untrained without a word. Each is refused, naming the
    model's linear layers; a container module is refused in one readable line."""
    from conftest import gpt2_numbers, llama_numbers
    from minillm_cli.models import LoraSettings, apply_lora

    with pytest.raises(InputError, match=r"\['v_porj'\] name no module of the model .*down_proj.*q_proj"):
        apply_lora(llama_numbers(0), LoraSettings(r=2, targets=["q_proj", "v_porj"]))
    with pytest.raises(InputError, match=r"\['c_projj'\] name no module .*c_attn, c_fc, c_proj"):  # (Conv1D)
        apply_lora(gpt2_numbers(0), LoraSettings(r=2, targets=["c_attn", "c_projj"]))
    with pytest.raises(InputError) as e:
        apply_lora(llama_numbers(0), LoraSettings(r=2, targets=["model"]))
    assert str(e.value) == "LoRA targets ['model']: Target module LlamaModel is not supported: name linear layers " \
                           "(or embeddings)"
    model = apply_lora(llama_numbers(0), LoraSettings(r=2, targets=["self_attn.q_proj", "v_proj"]))
    adapted = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in model.named_parameters() if "lora_A" in n}
    assert adapted == {"q_proj", "v_proj"}
    # all-linear, as peft spells it: every linear layer but the output head (GPT-2's are Conv1D)
    for build, want in ((llama_numbers, {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
                        (gpt2_numbers, {"c_attn", "c_proj", "c_fc"})):
        model = apply_lora(build(0), LoraSettings(r=2, targets=["all-linear"]))
        assert {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in model.named_parameters() if "lora_A" in n} == want


def test_an_adapter_whose_base_model_moved_says_so(tmp_path, tiny_dir):
    """An adapter folder whose base model folder has moved: the error named only the base's path,
    as a model the user had not given ("teacher '/old/base': not a local folder, and the Hugging
    Face Hub is unreachable"); it names the adapter, its base and where to set the base."""
    import json

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from minillm_cli.models import load_model, load_tokenizer

    adapter = tmp_path / "adapter"
    get_peft_model(AutoModelForCausalLM.from_pretrained(str(tiny_dir / "student")),
                   LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True)).save_pretrained(str(adapter))
    tok = load_tokenizer(str(tiny_dir / "student"))
    tok.save_pretrained(str(adapter))
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    for base in (str(tmp_path / "moved" / "student"), "old/student"):
        cfg["base_model_name_or_path"] = base
        (adapter / "adapter_config.json").write_text(json.dumps(cfg))
        gone = "a folder that does not exist" if base.startswith("/") else "not a local folder, and the Hugging Face Hub"
        with pytest.raises(InputError) as e:
            load_model(str(adapter), tokenizer=tok, device=torch.device("cpu"), what="teacher")
        assert str(e.value).startswith(f"teacher '{adapter}' is a LoRA adapter whose base model '{base}' is {gone}")
        assert str(e.value).endswith(f"set base_model_name_or_path in {adapter / 'adapter_config.json'} to its folder")
    for f in adapter.glob("tok*"):  # (no tokenizer of its own: its base's, which is gone too)
        f.unlink()
    with pytest.raises(InputError, match=f"model '{adapter}' is a LoRA adapter whose base model 'old/student'"):
        load_tokenizer(str(adapter), what="model")


def test_lora_on_a_tied_embedding_matrix_is_refused():
    """GPT-2 (and Llama-3.2-1B, Qwen2.5-0.5B, Gemma) tie the LM head to the input embeddings: an
    adapter on either was merged into the one tensor both share, so the saved model's other end
    changed too (logits 40 apart from the trained adapter's on a tiny GPT-2), and every command
    merges an adapter folder it loads. Refused; an untied head (this Llama's) is adapted."""
    import torch

    from conftest import gpt2_numbers, llama_numbers
    from minillm_cli.models import LoraSettings, apply_lora

    gpt2 = gpt2_numbers(0)
    assert gpt2.lm_head.weight is gpt2.transformer.wte.weight
    for targets in (["c_attn", "lm_head"], ["wte"]):
        with pytest.raises(InputError, match=r"adapt an embedding matrix that the model ties to its other end "
                                             r"\(lm_head, transformer.wte\)"):
            apply_lora(gpt2_numbers(0), LoraSettings(r=2, targets=targets))
    model = apply_lora(llama_numbers(0), LoraSettings(r=2, dropout=0.0, targets=["q_proj", "lm_head"]))
    torch.nn.init.normal_(model.base_model.model.lm_head.lora_B["default"].weight)
    x = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        trained = model(x).logits
        assert torch.allclose(model.merge_and_unload()(x).logits, trained, atol=1e-5)
