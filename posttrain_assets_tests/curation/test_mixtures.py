"""Semantic duplicates, diversity selection over the warehouse and mixtures, on a small warehouse of real texts.

The warehouse holds only what curation reads (silver.records' id/regime/source/domain/token_count and texts,
gold.sft's id/source/num_tokens), filled with Alpaca instructions and FastChat conversations."""

from __future__ import annotations

import json

import duckdb
import pyarrow as pa
import pytest
import yaml

from posttrain_assets.curation import store
from posttrain_assets.curation.embedder import load_embedder
from posttrain_assets.curation.mixtures import MixtureSpecError, build_mixture, load_spec, parse_spec
from posttrain_assets_tests.real_data import REAL_DATA


def _rows() -> list[dict]:
    alpaca = json.loads((REAL_DATA / "alpaca/alpaca_data_cleaned_1000.json").read_text())[:300]
    chats = json.loads((REAL_DATA / "fastchat/dummy_conversation.json").read_text())[:200]
    rows = []
    for i, r in enumerate(alpaca):
        text = r["instruction"] + ("\n" + r["input"] if r["input"] else "")
        rows.append({"id": f"a{i:04d}", "source": "alpaca", "domain": None, "messages": [text], "tokens": 20 + i % 30})
    for i, c in enumerate(chats):
        turns = [t["value"] for t in c["conversations"]]
        rows.append(
            {"id": f"f{i:04d}", "source": "fastchat", "domain": "chat", "messages": turns, "tokens": 50 + i % 7}
        )
    # A planted paraphrase of the first Alpaca instruction (MinHash would not pair these: few shared shingles).
    rows.append(
        {
            "id": "a9999",
            "source": "alpaca",
            "domain": None,
            "messages": [rows[0]["messages"][0] + " Please."],
            "tokens": 21,
        }
    )
    return rows


@pytest.fixture(scope="module")
def warehouse(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = str(tmp_path_factory.mktemp("curation") / "w.duckdb")
    rows = _rows()
    with duckdb.connect(path) as conn:
        conn.execute("CREATE SCHEMA silver; CREATE SCHEMA gold")
        conn.execute(
            "CREATE TABLE silver.records (id VARCHAR, regime VARCHAR, source VARCHAR, domain VARCHAR, "
            "token_count INTEGER, messages STRUCT(role VARCHAR, content VARCHAR)[], prompt VARCHAR, chosen VARCHAR, "
            "rejected VARCHAR)"
        )
        conn.execute("CREATE TABLE gold.sft (id VARCHAR, source VARCHAR, num_tokens INTEGER)")
        records = pa.Table.from_pylist(
            [
                {
                    "id": r["id"],
                    "regime": "sft",
                    "source": r["source"],
                    "domain": r["domain"],
                    "token_count": r["tokens"],
                    "messages": [
                        {"role": "user" if k % 2 == 0 else "assistant", "content": t}
                        for k, t in enumerate(r["messages"])
                    ],
                }
                for r in rows
            ]
        )
        conn.register("records", records)
        conn.execute(
            "INSERT INTO silver.records SELECT id, regime, source, domain, token_count, messages, NULL, NULL, NULL "
            "FROM records"
        )
        conn.execute("INSERT INTO gold.sft SELECT id, source, token_count FROM records")
        assert store.embed_silver(conn, load_embedder(), read_rows=64) == len(rows)
    return path


def test_embeddings_record_the_model_with_every_row(warehouse: str) -> None:
    with duckdb.connect(warehouse, read_only=True) as conn:
        models = conn.execute(
            "SELECT model, model_sha256, count(*), min(len(embedding)) FROM silver.embeddings GROUP BY ALL"
        ).fetchall()
    assert models == [("wordllama/l2_supercat_256", load_embedder().identity.model_sha256, 501, 256)]


def test_semantic_duplicates_find_the_planted_paraphrase_and_the_policy_drops_one(warehouse: str, tmp_path) -> None:
    with duckdb.connect(warehouse) as conn:
        report = store.find_semantic_duplicates(conn, 0.97, "report")
        pairs = conn.execute(
            "SELECT id_a, id_b, similarity FROM silver.semantic_duplicates WHERE id_b = 'a9999'"
        ).fetchall()
        assert store.dropped_ids_sql(conn)  # report: nothing dropped
        assert conn.execute(f"SELECT count(*) FROM ({store.dropped_ids_sql(conn)})").fetchone()[0] == 0
    assert report.dropped == {"sft": 0}
    assert [p[:2] for p in pairs] == [("a0000", "a9999")] and pairs[0][2] > 0.97
    with duckdb.connect(warehouse) as conn:
        dropped = store.find_semantic_duplicates(conn, 0.97, "drop")
        pool = store.load_pool(conn, "sft", "gold.sft", sources=["alpaca"], with_vectors=False)
        gone = [r[0] for r in conn.execute(store.dropped_ids_sql(conn)).fetchall()]
        with pytest.raises(ValueError, match="unknown semantic duplicate policy 'keep'"):
            store.find_semantic_duplicates(conn, 0.97, "keep")
        store.find_semantic_duplicates(conn, 0.97, "report")  # the other tests draw from every row
    # drop keeps the smallest id of each group: the planted paraphrase leaves curation, its original stays. (The
    # FastChat conversations here are not MinHash-deduplicated as silver's are: their templated twins pair up too.)
    assert "a9999" in gone and "a0000" not in gone and dropped.dropped["sft"] == len(gone)
    assert (
        "a9999" not in pool.ids and "a0000" in pool.ids and len(pool.ids) == 301 - sum(g.startswith("a") for g in gone)
    )


def test_diversity_selection_per_source_covers_more_than_random(warehouse: str) -> None:
    with duckdb.connect(warehouse) as conn:
        results = store.select_diverse(conn, {"sft": 0.5}, group_by="source", seed=3)
        stored = conn.execute(
            'SELECT "group", count(*), min(rank), max(rank) FROM silver.diversity_selection GROUP BY ALL ORDER BY 1'
        ).fetchall()
        again = conn.execute("SELECT id, rank, gain FROM silver.diversity_selection ORDER BY ALL").fetchall()
        store.select_diverse(conn, {"sft": 0.5}, group_by="source", seed=3)
        assert conn.execute("SELECT id, rank, gain FROM silver.diversity_selection ORDER BY ALL").fetchall() == again
    by_group = {r.group: r for r in results}
    # Half of 501 rows is 250.5: 250 whole rows, shared 150.5 : 100 -> 150 + 100 (largest remainder, no unit left).
    assert stored == [("alpaca", 150, 1, 150), ("fastchat", 100, 1, 100)]
    for r in results:
        assert r.coverage.mean_distance < 0.9 * r.coverage.random_mean_distance
    assert by_group["alpaca"].pool_rows == 301


SPEC = """
name: test_mix
regime: sft
seed: 11
total_tokens: 6000
components:
  - name: chats
    sources: [fastchat]
    weight: 2
    diversity: true
  - name: instructions
    sources: alpaca
    weight: 1
  - name: more_instructions
    sources: [alpaca]
    rows: 600
    epochs: 2
"""


def test_mixture_manifest_matches_its_rows_and_is_reproducible(warehouse: str, tmp_path) -> None:
    spec_file = tmp_path / "mix.yaml"
    spec_file.write_text(SPEC)
    spec = load_spec(spec_file)
    with duckdb.connect(warehouse) as conn:
        manifest = build_mixture(conn, spec, {"gold.sft": "v1"})
        rows = conn.execute(
            "SELECT position, component, id, epoch, tokens FROM gold.mixtures WHERE mixture = 'test_mix' "
            "ORDER BY position"
        ).fetchall()
        stored = json.loads(
            conn.execute("SELECT manifest FROM gold.mixture_manifests WHERE mixture = 'test_mix'").fetchone()[0]
        )
        assert build_mixture(conn, spec, {"gold.sft": "v1"}).to_dict() == manifest.to_dict()
        assert (
            conn.execute(
                "SELECT position, component, id, epoch, tokens FROM gold.mixtures ORDER BY position"
            ).fetchall()
            == rows
        )
    chats, instructions, more = manifest.components
    # Asked: weights 2:1 of 6,000 tokens; the explicit component 600 rows at 2 epochs.
    assert (chats.unit, chats.asked, instructions.asked) == ("tokens", 4000.0, 2000.0)
    assert (more.unit, more.asked_rows, more.epochs) == ("rows", 600, 2)
    # Delivered never exceeds asked; FastChat rows are 50-56 tokens, so the chats are within one row of 4,000.
    assert 4000 - 56 < chats.delivered_tokens <= 4000 and instructions.delivered_tokens <= 2000
    # The last component's pool is what the instructions left: 301 - drawn; 300 rows per epoch are asked, the pool
    # has fewer, so it delivers 2 x its pool and says so; nothing is up-sampled beyond epochs.
    assert more.pool_rows == 301 - instructions.drawn_rows == more.drawn_rows
    assert more.excluded_as_drawn_earlier == instructions.drawn_rows
    assert more.delivered_rows == 2 * more.pool_rows < 600 and more.pool_exhausted
    assert more.shortfall == 600 - more.delivered_rows
    # The manifest's arithmetic is the table's.
    per_component = {}
    for _, component, _, _, tokens in rows:
        n, t = per_component.get(component, (0, 0))
        per_component[component] = (n + 1, t + tokens)
    for c in manifest.components:
        assert per_component[c.name] == (c.delivered_rows, c.delivered_tokens)
    assert [p for p, *_ in rows] == list(range(len(rows))) and manifest.rows == len(rows)
    assert {e for *_, e, _ in rows if _ == "more_instructions"} <= {0, 1}
    epochs = {}
    for _, component, rid, epoch, _ in rows:
        epochs.setdefault((component, rid), []).append(epoch)
    assert all(v == [0, 1] for (c, _), v in epochs.items() if c == "more_instructions")
    assert all(v == [0] for (c, _), v in epochs.items() if c != "more_instructions")
    assert stored["spec_sha256"] == spec.sha256 and stored["delivered"] == {
        "rows": manifest.rows,
        "tokens": manifest.tokens,
    }
    assert (
        stored["gold_versions"]["gold.sft"]["rows"] == 501
        and stored["gold_versions"]["gold.sft"]["data_version"] == "v1"
    )
    assert stored["embedding_model"]["name"] == "wordllama/l2_supercat_256"


def test_spec_hash_is_stable_across_layouts_and_changes_with_content() -> None:
    data = yaml.safe_load(SPEC)
    spec = parse_spec(data)
    reordered = {k: data[k] for k in reversed(list(data))}
    assert parse_spec(reordered).sha256 == spec.sha256
    assert parse_spec(yaml.safe_load(SPEC.replace("seed: 11", "seed: 12"))).sha256 != spec.sha256
    # Defaults are part of the hash's input: spelling out epochs: 1 changes nothing.
    explicit = yaml.safe_load(SPEC.replace("    weight: 1\n", "    weight: 1\n    epochs: 1\n"))
    assert parse_spec(explicit).sha256 == spec.sha256
    # Pinned: a change to the canonical form (fields, defaults, serialisation) changes every mixture's hash.
    assert spec.sha256 == "355bd126134c7d4db86662eaf6ff21b6e7dce9585593f9b8bbff010b9aa36e1e"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d["components"][0].update(tokens=10), "give exactly one of weight, tokens, rows"),
        (lambda d: d["components"][2].update(epochs=1.5), r"components\[2\].epochs: must be an integer"),
        (lambda d: d.pop("total_tokens"), "a weight needs the spec's total_tokens or total_rows"),
        (lambda d: d.update(regime="dpo"), "regime: must be one of sft, preference, rl"),
        (lambda d: d["components"][1].update(name="chats"), "'chats' is used twice"),
        (lambda d: d["components"][0].update(upsample=2), r"unknown field\(s\) upsample"),
    ],
)
def test_bad_specs_name_the_file_and_field(change, message) -> None:
    data = yaml.safe_load(SPEC)
    change(data)
    with pytest.raises(MixtureSpecError, match=message):
        parse_spec(data, "mix.yaml")
