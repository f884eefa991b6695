"""The architecture registry: a name registered twice warns, and tests swap toy architectures in through its hooks."""

from __future__ import annotations

import warnings

import pytest
import torch

from vocoslicer.errors import UserError
from vocoslicer.models import factory


def _first(**_: object) -> torch.nn.Module:
    return torch.nn.Identity()


def _second(**_: object) -> torch.nn.Module:
    return torch.nn.Flatten()


def test_registering_a_name_twice_warns_with_both_builders() -> None:
    factory.register_architecture("twice-test")(_first)
    try:
        with pytest.warns(RuntimeWarning, match="'twice-test' registered twice") as caught:
            factory.register_architecture("twice-test")(_second)
        text = str(caught[0].message)
        assert "_first" in text and "_second" in text
        assert isinstance(factory.build_model("twice-test"), torch.nn.Flatten)  # the later one wins, as before
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            factory.register_architecture("twice-test")(_second)  # the same builder again: no warning
            factory.register_architecture("twice-test", replace=True)(_first)  # an intended replacement
    finally:
        assert factory.unregister_architecture("twice-test") is _first
    assert factory.unregister_architecture("twice-test") is None
    with pytest.raises(UserError, match="unknown model architecture 'twice-test'"):
        factory.build_model("twice-test")


def test_temporary_architecture_restores_what_was_there() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with factory.temporary_architecture("temp-test", _first):
            assert isinstance(factory.build_model("temp-test"), torch.nn.Identity)
            assert "temp-test" in factory.architectures()
        assert "temp-test" not in factory.architectures()
        original = factory.build_model("unet", {"channels": [4, 8], "strides": [2]})
        with factory.temporary_architecture("unet", _second):  # shadowing a real one, then putting it back
            assert isinstance(factory.build_model("unet"), torch.nn.Flatten)
        assert type(factory.build_model("unet", {"channels": [4, 8], "strides": [2]})) is type(original)
