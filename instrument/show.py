"""What control can ask of a running show besides setting parameters.

The control layer (MIDI, OSC, keys) talks to the running instrument through this protocol;
`instrument play` implements it over the engine and the stage. Every method must return quickly
(it runs on a control thread) and must never raise on a performer's input: bad requests go to
`warn` and are ignored.
"""

from __future__ import annotations

from typing import Protocol

from .params import ParamSpace


class Show(Protocol):
    params: ParamSpace

    def set_prompt(self, text: str, slot: int = 0) -> None:
        """Prompt A (slot 0) or B (slot 1); the live parameter 'prompt/blend' mixes them."""

    def switch_patch(self, which: str | int) -> None:
        """By name, by index in the patch list, or '+1' / '-1' for next / previous."""

    def save_patch(self, path: str | None = None) -> str:
        """Save the current state as a new patch; returns where it went."""

    def freeze(self, on: bool | None = None) -> None:
        """Hold the picture (None toggles)."""

    def panic(self) -> None:
        """Every bend's mix to 0 at once."""

    def learn(self, param: str | None) -> None:
        """Arm MIDI learn for a parameter (None disarms)."""

    def warn(self, message: str) -> None:
        """One line for the performer (HUD and log), rate-limited by the receiver."""
