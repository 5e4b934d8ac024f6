"""posttrain_assets.warehouse.stage_cache: stage keys and cache tables."""

from __future__ import annotations

from dataclasses import dataclass

import duckdb

from posttrain_assets.warehouse.model import Column, Table
from posttrain_assets.warehouse.stage_cache import Reuse, ensure_cache_table, open_caches, stage_key

CACHE = Table("cache", "things", "test cache", (Column("stage_key", "VARCHAR", "key"), Column("id", "VARCHAR", "id")))
PARTNER = Table(
    "cache", "partners", "its partner", (Column("stage_key", "VARCHAR", "key"), Column("id", "VARCHAR", "id"))
)


@dataclass(frozen=True)
class Config:
    languages: frozenset[str]
    limit: int


def test_a_stage_key_is_stable_for_sets_and_dataclasses_and_changes_with_any_part() -> None:
    key = stage_key("gate", config=Config(frozenset({"en", "fr", "de"}), 3), code="abc")
    assert key == stage_key("gate", code="abc", config=Config(frozenset({"de", "fr", "en"}), 3))
    assert key != stage_key("gate", config=Config(frozenset({"en", "fr"}), 3), code="abc")
    assert key != stage_key("gate", config=Config(frozenset({"en", "fr", "de"}), 4), code="abc")
    assert key != stage_key("gate", config=Config(frozenset({"en", "fr", "de"}), 3), code="abd")
    assert key != stage_key("tokenize", config=Config(frozenset({"en", "fr", "de"}), 3), code="abc")
    assert len(key) == 64


def test_a_cache_table_of_another_shape_is_dropped_and_one_of_this_shape_kept() -> None:
    conn = duckdb.connect()
    conn.execute("CREATE SCHEMA cache; CREATE TABLE cache.things (stage_key VARCHAR, id VARCHAR, old INTEGER)")
    conn.execute("INSERT INTO cache.things VALUES ('k', 'a', 1)")
    ensure_cache_table(conn, CACHE)
    assert conn.execute("SELECT * FROM cache.things").fetchall() == []
    conn.execute("INSERT INTO cache.things VALUES ('k', 'b')")
    ensure_cache_table(conn, CACHE)
    assert conn.execute("SELECT * FROM cache.things").fetchall() == [("k", "b")]


def test_a_stages_caches_are_emptied_together_when_one_is_made_anew() -> None:
    conn = duckdb.connect()
    open_caches(conn, CACHE, PARTNER)
    conn.execute("INSERT INTO cache.things VALUES ('k', 'a'); INSERT INTO cache.partners VALUES ('k', 'a')")
    open_caches(conn, CACHE, PARTNER)  # same shapes: both kept
    assert conn.execute("SELECT count(*) FROM cache.things").fetchone() == (1,)
    assert conn.execute("SELECT count(*) FROM cache.partners").fetchone() == (1,)
    # older code's partner table had another column: it is made anew, and its partner's entries (which say the
    # row was computed) are forgotten with it, so the row is computed again rather than read from nowhere
    conn.execute("DROP TABLE cache.partners; CREATE TABLE cache.partners (stage_key VARCHAR, id VARCHAR, old INT)")
    conn.execute("INSERT INTO cache.partners VALUES ('k', 'a', 1)")
    open_caches(conn, CACHE, PARTNER)
    assert conn.execute("SELECT count(*) FROM cache.things").fetchone() == (0,)
    assert conn.execute("SELECT * FROM cache.partners").fetchall() == []
    # reuse=False empties them all too
    conn.execute("INSERT INTO cache.things VALUES ('k', 'a'); INSERT INTO cache.partners VALUES ('k', 'a')")
    open_caches(conn, CACHE, PARTNER, reuse=False)
    assert conn.execute(
        "SELECT count(*) FROM cache.things UNION ALL SELECT count(*) FROM cache.partners"
    ).fetchall() == [
        (0,),
        (0,),
    ]


def test_reuse_adds_up_and_names_its_metadata() -> None:
    total = Reuse(3, 4) + Reuse(1, 0)
    assert total == Reuse(computed=4, reused=4)
    assert total.metadata("gate") == {"rows_computed/gate": 4, "rows_reused/gate": 4}
