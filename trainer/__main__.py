"""`python -m trainer`: the command line; `--help` lists tapeloop's flags, `--helpfull` all."""

from trainer.cli.main import run

if __name__ == "__main__":
    run()
