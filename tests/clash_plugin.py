"""A user's module that registers a penalty under a name a built-in already has (`l1`)."""

from trainer import Penalty, register_penalty


@register_penalty("l1")
class MyL1(Penalty):
    has_loss = True

    def loss(self, variables):
        raise NotImplementedError  # never reached: registering fails
