"""`python -m trainer`: runs the command line."""

from trainer.cli.main import run

if __name__ == "__main__":
    run()
