"""A model card names the path to serve its own checkpoint: `runs/tiny` for a model trained into runs/tiny (the card
said `models/zoo/tiny`, issue 28), `models/zoo/NAME` for a shipped one."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from support import SHIPPED

from models import load_checkpoint
from training import model_card


def test_the_card_of_a_trained_model_serves_its_own_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    out = Path("runs") / "tiny"  # as `python -m training train --out runs/tiny` passes it
    shutil.copytree(SHIPPED, out)
    card = model_card.write(out, load_checkpoint(out).meta).read_text()
    assert "`python -m service --model runs/tiny`" in card
    assert "models/zoo/tiny" not in card

    elsewhere = tmp_path.parent / f"{tmp_path.name}-outside" / "tiny"
    shutil.copytree(SHIPPED, elsewhere)
    card = model_card.write(elsewhere, load_checkpoint(elsewhere).meta).read_text()
    assert f"`python -m service --model {elsewhere}`" in card
    shutil.rmtree(elsewhere.parent)


def test_a_shipped_card_serves_the_zoo_path() -> None:
    meta = load_checkpoint(SHIPPED).meta
    assert "`python -m service --model models/zoo/mnist-fcn-dr`" in model_card.render(
        meta, SHIPPED.name, "", None, SHIPPED
    )
