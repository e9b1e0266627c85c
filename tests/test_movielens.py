"""The MovieLens-100K converter, on a hand-made folder in the published format."""

from datetime import datetime

import polars as pl
import pytest

from benchmarks.movielens import checksum, convert_movielens
from tasks.logs import open_logs

GENRES = ["unknown", "Action", "Comedy", "Drama"]


@pytest.fixture
def movielens(tmp_path):
    src = tmp_path / "ml"
    src.mkdir()
    (src / "u.genre").write_text("".join(f"{g}|{i}\n" for i, g in enumerate(GENRES)) + "\n")
    (src / "u.item").write_bytes(
        "1|Toy Story (1995)|01-Jan-1995||http://x|0|0|1|0\n2|Caf\xe9 Noir (1996)|||http://y|0|1|0|1\n".encode("latin-1")
    )
    (src / "u.user").write_text("1|24|M|technician|85711\n2|53|F|other|94043\n")
    (src / "u.data").write_text("1\t1\t5\t881250949\n2\t1\t3\t881250950\n1\t2\t4\t881250900\n2\t2\t1\t881250999\n")
    return src


def test_ratings_become_impressions_and_clicks(movielens, tmp_path):
    counts = convert_movielens(movielens, tmp_path / "logs")
    assert counts == {"impressions": 4, "ads": 2, "users": 2}
    impressions = pl.read_parquet(tmp_path / "logs" / "impressions")
    assert impressions["ts"].to_list() == sorted(impressions["ts"].to_list())  # ids follow time
    rows = {(r["user_id"], r["ad_id"]): r for r in impressions.iter_rows(named=True)}
    assert rows[(1, 1)]["clicked"] and rows[(1, 2)]["clicked"]  # ratings 5 and 4
    assert not rows[(2, 1)]["clicked"] and not rows[(2, 2)]["clicked"]  # ratings 3 and 1
    assert rows[(1, 1)]["ts"] == datetime(1997, 12, 4, 15, 55, 49)


def test_ads_and_users_carry_the_text(movielens, tmp_path):
    convert_movielens(movielens, tmp_path / "logs")
    ads = pl.read_parquet(tmp_path / "logs" / "ads").sort("ad_id").to_dicts()
    assert ads[0]["title"] == "Toy Story (1995)" and ads[0]["description"] == "Genres: Comedy."
    assert ads[1]["description"] == "Genres: Action, Drama." and ads[1]["category"] == "Action"
    assert ads[1]["title"].startswith("Caf") and ads[1]["created_at"] is None  # missing release date
    assert ads[1]["genres"] == ["Action", "Drama"] and ads[1]["year"] == 1996  # for the content-aware peers
    users = pl.read_parquet(tmp_path / "logs" / "users").sort("user_id").to_dicts()
    assert users[0] == {"user_id": 1, "age": 24, "gender": "male", "occupation": "technician"}  # no zip code
    open_logs(str(tmp_path / "logs"))  # the result passes adrank's contract checks


def test_checksum_names_the_exact_data(movielens):
    before = checksum(movielens)
    (movielens / "u.data").write_text("1\t1\t5\t881250949\n")
    assert checksum(movielens) != before


def test_missing_files_are_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing \['u.data', 'u.item', 'u.user', 'u.genre'\]"):
        convert_movielens(tmp_path, tmp_path / "logs")


@pytest.mark.fault
def test_conversion_replaces_only_a_folder_it_wrote(movielens, tmp_path):
    convert_movielens(movielens, tmp_path / "logs")
    assert convert_movielens(movielens, tmp_path / "logs")["impressions"] == 4  # its own: replaced
    (tmp_path / "mine" / "impressions").mkdir(parents=True)
    (tmp_path / "mine" / "impressions" / "keep.parquet").write_bytes(b"someone's data")
    with pytest.raises(FileExistsError, match="mine"):
        convert_movielens(movielens, tmp_path / "mine")
    assert (tmp_path / "mine" / "impressions" / "keep.parquet").read_bytes() == b"someone's data"
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_folder_written_whole_leaves_nothing_when_the_writing_fails(tmp_path):
    from tasks.folders import replaced_whole

    with replaced_whole(tmp_path / "out") as tmp:
        (tmp / "first").write_text("1")
    with pytest.raises(RuntimeError), replaced_whole(tmp_path / "out") as tmp:
        (tmp / "second").write_text("half")
        raise RuntimeError("killed mid-write")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [".adrank-wrote-this", "first"]
    assert not list(tmp_path.glob(".*.tmp"))
