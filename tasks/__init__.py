"""Built-in tasks; importing this package registers them."""

from tasks import cifar10, example_penalties, mnist, synthetic

__all__ = ["cifar10", "example_penalties", "mnist", "synthetic"]
