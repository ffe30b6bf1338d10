"""`python -m minillm_cli ...` is `minillm ...` (torchrun and accelerate launch need a module)."""
from minillm_cli.cli.app import main

if __name__ == "__main__":
    main()
