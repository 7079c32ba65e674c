"""`python -m gpt ...` runs the `gpt` command (gpt/cli.py)."""
from gpt.cli import main

if __name__ == "__main__":
    main()
