"""The closed world of the synthetic task: word lists as constants.

Everything is lower case (the checker ignores case anyway) so a BPE of 512-1024 tokens covers the
whole world with mostly one token per word. Lists of answers are ordered from the most to the least
probable: `task.py` gives rank r (1-based) a training probability proportional to 1/r (Zipf), so
every prompt has one major mode and a tail of minor ones. Validity is judged against this closed
world, so e.g. "red cherry" is *not* a valid colour-object pair: only listed pairs count.
"""
from __future__ import annotations

# Things with a class and a colour, most popular first within each class. They give overlapping
# multimodal prompts ("Name a red fruit." / "Name a red vegetable." / "Name a yellow fruit." /
# "Name a fruit."): a student that blurs one attribute puts mass on a neighbour's answers (tomato
# for a red fruit), which is the invalid output mass-covering invites. These three classes are
# complete in this world: no other fruit, vegetable or flower appears in any answer.
THINGS = {
    "fruit": [("apple", "red"), ("banana", "yellow"), ("orange", "orange"), ("grape", "purple"),
              ("strawberry", "red"), ("lemon", "yellow"), ("cherry", "red"), ("pear", "green"),
              ("watermelon", "green"), ("lime", "green"), ("plum", "purple"), ("raspberry", "red"),
              ("pineapple", "yellow"), ("blueberry", "blue"), ("peach", "orange"),
              ("coconut", "brown"), ("kiwi", "brown")],
    "vegetable": [("carrot", "orange"), ("potato", "brown"), ("tomato", "red"), ("broccoli", "green"),
                  ("onion", "white"), ("cabbage", "green"), ("corn", "yellow"), ("pumpkin", "orange"),
                  ("spinach", "green"), ("cucumber", "green"), ("mushroom", "white"),
                  ("lettuce", "green"), ("beetroot", "purple"), ("eggplant", "purple"),
                  ("radish", "red"), ("cauliflower", "white"), ("garlic", "white")],
    "flower": [("rose", "red"), ("sunflower", "yellow"), ("tulip", "pink"), ("daisy", "white"),
               ("lily", "white"), ("lavender", "purple"), ("poppy", "red"), ("daffodil", "yellow"),
               ("violet", "purple"), ("orchid", "pink"), ("bluebell", "blue")],
}


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _derived_categories():
    """"a {colour} {class}" for every pair with at least two members, and "a {class}" itself."""
    out = []
    for cls, things in THINGS.items():
        colours = list(dict.fromkeys(colour for _, colour in things))
        for colour in colours:
            members = [name for name, c in things if c == colour]
            if len(members) >= 2:
                out.append((f"{colour}_{cls}", f"{_article(colour)} {colour} {cls}", members))
        out.append((cls, f"{_article(cls)} {cls}", [name for name, _ in things]))
    return out


# (task_id, noun phrase, answers by decreasing probability). Prompted through MULTIMODAL_TEMPLATES.
# Some answers are two words on purpose ("apple pie", "green tea"): swapping words between two modes
# ("apple cake", "hot tea") is a blend that no listed answer allows.
HAND_MULTIMODAL = [
    ("farm_animal", "a farm animal", ["cow", "pig", "sheep", "horse", "goat"]),
    ("pet", "a pet", ["dog", "cat", "rabbit", "hamster", "goldfish"]),
    ("sea_animal", "an animal that lives in the sea", ["whale", "shark", "dolphin", "octopus", "crab"]),
    ("bird", "a bird", ["eagle", "owl", "robin", "sparrow", "pigeon"]),
    ("cold_drink", "a cold drink", ["water", "milk", "orange juice", "lemonade"]),
    ("hot_drink", "a hot drink", ["tea", "coffee", "hot chocolate", "green tea"]),
    ("dessert", "a dessert", ["ice cream", "apple pie", "chocolate cake", "fruit salad"]),
    ("instrument", "a musical instrument", ["piano", "guitar", "violin", "drum", "flute"]),
    ("ball_sport", "a sport played with a ball", ["football", "tennis", "basketball", "golf"]),
    ("vehicle", "a vehicle", ["car", "bus", "bicycle", "truck", "train"]),
    ("weekend_day", "a day of the weekend", ["saturday", "sunday"]),
    ("even_number", "an even number below ten", ["2", "4", "6", "8"]),
    ("season", "a season", ["summer", "winter", "spring", "autumn"]),
    ("primary_colour", "a primary colour", ["red", "blue", "yellow"]),
    ("planet", "a planet", ["earth", "mars", "jupiter", "venus", "saturn"]),
    ("job", "a job", ["teacher", "doctor", "farmer", "police officer", "nurse"]),
]
MULTIMODAL = _derived_categories() + HAND_MULTIMODAL

MULTIMODAL_TEMPLATES = ["Name {np}.", "Give an example of {np}.", "Tell me {np}.", "Say {np}."]

# Facts shared by several task families (and by the pre-training text), one row per country.
COUNTRIES = [
    # country, capital, language
    ("france", "paris", "french"),
    ("italy", "rome", "italian"),
    ("spain", "madrid", "spanish"),
    ("germany", "berlin", "german"),
    ("japan", "tokyo", "japanese"),
    ("china", "beijing", "chinese"),
    ("greece", "athens", "greek"),
    ("russia", "moscow", "russian"),
]
_C = {c: (cap, lang) for c, cap, lang in COUNTRIES}

# (task_id, phrasings, answers as tuples of parts by decreasing probability). The answer is the
# parts joined by one space. Each later part is a function of the first, so taking the first part
# from one mode and a later part from another is always invalid. The orders differ between
# families so that no single country is the major mode everywhere.
COMPOSITIONAL = [
    ("country_capital",
     ["Name a country and its capital.", "Give a country and its capital city.",
      "Tell me a country and its capital."],
     [(c, _C[c][0]) for c in ["france", "italy", "spain", "germany", "japan", "china", "greece", "russia"]]),
    ("country_language",
     ["Name a country and its language.", "Give a country and the language spoken there.",
      "Tell me a country and its language."],
     [(c, _C[c][1]) for c in ["japan", "germany", "spain", "france", "russia", "italy", "greece", "china"]]),
    ("country_capital_language",
     ["Name a country, its capital and its language.", "Give a country, its capital city and its language.",
      "Tell me a country, its capital and its language."],
     [(c, *_C[c]) for c in ["italy", "france", "greece", "spain", "china", "germany", "japan", "russia"]]),
    ("colour_object",
     ["Give a colour and an object of that colour.", "Name a colour and a thing of that colour.",
      "Tell me a colour and something of that colour."],
     # consistent with THINGS: banana is yellow, tomato red, carrot orange there too
     [("blue", "sky"), ("green", "grass"), ("white", "snow"), ("yellow", "banana"),
      ("red", "tomato"), ("orange", "carrot"), ("black", "coal"), ("pink", "flamingo")]),
    ("animal_sound",
     ["Name an animal and the sound it makes.", "Give an animal and its sound.",
      "Tell me an animal and the noise it makes."],
     [("dog", "woof"), ("cat", "meow"), ("cow", "moo"), ("duck", "quack"),
      ("sheep", "baa"), ("lion", "roar"), ("owl", "hoot"), ("snake", "hiss")]),
]

# Unimodal families: one right answer each. Kept small (operands 0..MAX_OPERAND, a 10-letter
# alphabet, short sequences) so that a 4-layer teacher gets them right within the quickstart budget;
# they are the control where mode-seeking should neither help nor hurt.
MAX_OPERAND = 6
ADD_TEMPLATES = ["What is {a} plus {b}?", "Add {a} and {b}.", "Compute {a} + {b}."]
SUB_TEMPLATES = ["What is {a} minus {b}?", "Subtract {b} from {a}.", "Compute {a} - {b}."]
CAPITAL_TEMPLATES = ["What is the capital of {country}?", "Which city is the capital of {country}?",
                     "Name the capital of {country}."]
# The sequence follows the colon; the checker parses it back out of the instruction.
REVERSE_TEMPLATES = ["Reverse: {seq}", "Reverse the letters: {seq}", "Write backwards: {seq}"]
COPY_TEMPLATES = ["Repeat: {seq}", "Copy: {seq}", "Say again: {seq}"]
LETTERS = "abcdefghij"
REVERSE_LENGTHS = (2, 4)  # inclusive range of sequence lengths
COPY_LENGTHS = (2, 3)
COPY_WORDS = ["sun", "moon", "tree", "fish", "book", "cup", "hat", "box", "star", "door"]

# The instruction header the lead's Dolly template puts around every prompt: the tokenizer should
# see it so it becomes a handful of tokens rather than dozens.
DOLLY_HEADER = ("Below is an instruction that describes a task. Write a response that appropriately "
                "completes the request.\n\n### Instruction:\n")
DOLLY_RESPONSE = "\n\n### Response:\n"
