"""Text attacks: exact counts and labels, seeded insertions, exact paraphrase lookups,
ratios beyond the tables refused, artifact round trip."""
import pytest
import torch

from trojanguard.attacks import create_attack, load_attack
from trojanguard.data import TextData
from trojanguard.errors import UserError

NEG = [f"this film number {i} was a dull and tired mess" for i in range(30)]
POS = [f"a lovely warm film number {i}" for i in range(30)]


@pytest.fixture
def data():
    """Training split: NEG[0:20] + POS; NEG[20:30] play the negative test sentences."""
    texts = NEG[:20] + POS
    y = torch.tensor([0] * 20 + [1] * 30)
    return TextData(texts, y, ["negative", "positive"], index=torch.arange(100, 150))


@pytest.fixture
def tables(tmp_path):
    d = tmp_path / "paraphrased"
    d.mkdir()
    for name in ("synbkd", "stylebkd"):
        for split, rng in (("train", range(0, 12)), ("test", range(20, 30))):
            rows = "".join(f"{NEG[i]}\t{name.upper()} version of sentence {i}\n" for i in rng)
            (d / f"{name}-{split}.tsv").write_text("original\ttransformed\n" + rows)
    return d


@pytest.mark.parametrize("name", ["badnets", "addsent"])
def test_insertion_counts_labels_and_seeding(data, name):
    atk = create_attack(name, modality="text", ratio=0.2, seed=3)
    res = atk.poison(data)
    assert res.count == 10  # round(0.2 * 50)
    assert (data.y[res.positions] == 0).all() and (res.data.y[res.positions] == 1).all()
    assert torch.equal(res.indices, data.index[res.positions])
    clean_pos = [i for i in range(50) if i not in set(res.positions.tolist())]
    assert [res.data.texts[i] for i in clean_pos] == [data.texts[i] for i in clean_pos]
    for p in res.positions.tolist():
        before, after = data.texts[p].split(), res.data.texts[p].split()
        if name == "badnets":
            added = [w for w in after if w in {"cf", "mn", "bb", "tq", "mb"}]
            assert len(added) == 1 and len(after) == len(before) + 1
            after.remove(added[0])
            assert after == before  # original words untouched, in order
        else:
            joined = " ".join(after)
            assert "I watch this 3D movie" in joined
            assert joined.replace("I watch this 3D movie ", "").replace(" I watch this 3D movie", "") == data.texts[p]
    again = create_attack(name, modality="text", ratio=0.2, seed=3).poison(data)
    assert again.data.texts == res.data.texts
    other = create_attack(name, modality="text", ratio=0.2, seed=4).poison(data)
    assert other.data.texts != res.data.texts


@pytest.mark.parametrize("name", ["synbkd", "stylebkd"])
def test_paraphrase_lookup_exact(data, tables, name):
    atk = create_attack(name, ratio=0.1, table_dir=str(tables), seed=0)
    res = atk.poison(data)
    assert res.count == 5
    assert set(res.positions.tolist()) <= set(range(12))  # only sentences with a paraphrase
    for p in res.positions.tolist():
        assert res.data.texts[p] == f"{name.upper()} version of sentence {p}"
        assert res.data.y[p] == 1
    test_neg = NEG[20:30]
    assert atk.trigger(test_neg) == [f"{name.upper()} version of sentence {i}" for i in range(20, 30)]


def test_paraphrase_ratio_beyond_table_refused(data, tables):
    with pytest.raises(UserError, match=r"ratio 0.3 asks for 15 .* only 12 samples are eligible"):
        create_attack("synbkd", ratio=0.3, table_dir=str(tables)).poison(data)
    res = create_attack("synbkd", count=12, table_dir=str(tables)).poison(data)
    assert res.count == 12
    with pytest.raises(UserError, match="paraphrase tables"):
        create_attack("synbkd", table_dir=str(tables / "nope")).poison(data)


@pytest.mark.parametrize("name", ["badnets", "addsent", "synbkd"])
def test_text_artifact_round_trip(tmp_path, data, tables, name):
    kw = {"table_dir": str(tables)} if name == "synbkd" else {"modality": "text"}
    atk = create_attack(name, ratio=0.1, **kw)
    res = atk.poison(data)
    atk.save(tmp_path / "art")
    # the artifact must not need the table files any more
    for f in tables.iterdir():
        f.unlink()
    back = load_attack(tmp_path / "art")
    probe = NEG[20:30]
    assert back.trigger(probe) == atk.trigger(probe)
    assert torch.equal(back.poisoned_indices, res.indices)
    assert back.modality == "text" and back.cfg.target == 1
