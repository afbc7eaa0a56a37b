"""bench.overhead runs every op and backend it lists and prints one table row for each."""
from bench import overhead


def test_overhead_prints_a_row_per_op_and_backend(capsys):
    assert overhead.main(["--calls", "2", "--rounds", "1", "--backends", "torch"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "torch |" in line]
    assert [row.split(" | ")[0][2:] for row in rows] == list(overhead.OPS)
