import gzip

import numpy as np
import pytest

from segrefine import SegRefineError
from segrefine.gem import aggregate_by_labels, density_labels, read_gem


def _write(path, text, gz=True):
    if gz:
        with gzip.open(path, "wt") as fh:
            fh.write(text)
    else:
        path.write_text(text)
    return path


def test_real_gem_without_header(realdata):
    gem = read_gem(realdata / "stereoseq-spateo-gem" / "SS200000135TL_D1_bin1_small.gem.gz")
    assert len(gem.count) == 77634 and gem.count.min() >= 1
    assert gem.header == {} and gem.offset == (0, 0)
    assert "0610009B22Rik" in set(gem.genes)


def test_real_gemv02_with_header_lines_and_exon_column(realdata):
    gem = read_gem(realdata / "stereoseq-gemv02-header" / "Y00855N1_first10000.gem.gz")
    assert gem.header["Stereo-seqChip"] == "Y00855N1" and gem.header["FileFormat"] == "GEMv0.2"
    assert gem.offset == (0, 0) and len(gem.genes) == 7
    assert int(gem.count.sum()) > 0


@pytest.mark.parametrize("col", ["MIDCount", "MIDCounts", "UMICount"])
def test_count_column_variants_and_gene_name(tmp_path, col):
    p = _write(tmp_path / "a.gem", f"geneID\tgeneName\tx\ty\t{col}\nG1\tA\t1\t2\t3\nG2\tB\t1\t2\t0\n", gz=False)
    gem = read_gem(p)
    assert list(gem.count) == [3] and list(gem.genes) == ["G1", "G2"]  # zero-count record dropped


@pytest.mark.parametrize(
    "row,message",
    [
        ("G1\t5\t6\t-1", "column MIDCount must be an integer >= 0, got '-1'"),
        ("G1\t5\t6\t1.5", "column MIDCount must be an integer >= 0, got '1.5'"),
        ("G1\tx\t6\t1", "column x must be an integer >= 0, got 'x'"),
    ],
)
@pytest.mark.parametrize("chunk", [1, 2, 3, 1 << 22])
def test_bad_values_name_file_and_line(tmp_path, row, message, chunk):
    p = _write(tmp_path / "b.gem.gz", "#OffsetX=0\n#OffsetY=0\ngeneID\tx\ty\tMIDCount\nG1\t1\t2\t1\n" + row + "\n")
    with pytest.raises(SegRefineError, match=rf"b.gem.gz:5: {message}"):
        read_gem(p, chunk=chunk)


def test_missing_column_and_truncated_gzip(tmp_path):
    p = _write(tmp_path / "c.gem.gz", "geneID\tx\tMIDCount\nG1\t1\t1\n")
    with pytest.raises(SegRefineError, match=r"c.gem.gz: missing column\(s\) \['y'\]"):
        read_gem(p)
    full = _write(tmp_path / "d.gem.gz", "geneID\tx\ty\tMIDCount\n" + "G1\t1\t2\t1\n" * 20000)
    data = full.read_bytes()
    (tmp_path / "cut.gem.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(SegRefineError, match="cut.gem.gz: the gzip stream is damaged or ends early"):
        read_gem(tmp_path / "cut.gem.gz")


def test_exact_aggregation_with_touching_cells_offsets_and_border(tmp_path):
    labels = np.zeros((4, 6), np.uint32)
    labels[0:2, 0:2] = 7
    labels[0:2, 2:4] = 9  # touches cell 7
    labels[3, 5] = 11  # at the border; cell 12 would be empty: absent from the result
    rows = [
        "geneID\tx\ty\tMIDCount",
        "A\t100\t50\t2",  # (0, 0) -> cell 7
        "B\t101\t51\t1",  # (1, 1) -> cell 7
        "A\t102\t50\t4",  # (2, 0) -> cell 9
        "C\t105\t53\t5",  # (5, 3) -> cell 11
        "A\t104\t52\t3",  # background
        "B\t200\t200\t6",
    ]  # outside the label image
    gem = read_gem(_write(tmp_path / "e.gem", "\n".join(rows) + "\n", gz=False))
    ids, matrix, outside = aggregate_by_labels(gem, labels, origin=(100, 50))
    assert list(ids) == [7, 9, 11] and outside == 9
    dense = matrix.toarray()  # genes sorted: A, B, C
    np.testing.assert_array_equal(dense, [[2, 1, 0], [4, 0, 0], [0, 0, 5]])


@pytest.mark.parametrize(
    "row,message",
    [
        ("G1\t1\t2\t1\t7\t8", r"m.gem:5: malformed GEM line: 6 fields, the header names 4"),
        ("G1\t1", r"m.gem:5: malformed GEM line: no value in column y"),
    ],
)
@pytest.mark.parametrize("chunk", [1, 2, 3, 1 << 22])
def test_malformed_lines_name_file_and_line(tmp_path, row, message, chunk):
    """The malformed line is the last one: with chunk 1, 2 or 3 it falls in the last chunk, alone or not."""
    p = _write(
        tmp_path / "m.gem", "#OffsetX=0\n#OffsetY=0\ngeneID\tx\ty\tMIDCount\nG1\t1\t2\t1\n" + row + "\n", gz=False
    )
    with pytest.raises(SegRefineError, match=message):
        read_gem(p, chunk=chunk)


def test_chunked_reading_gives_the_same_records_and_gene_codes_at_any_chunk_size(realdata):
    from segrefine.gem import GemReader

    path = realdata / "stereoseq-spateo-gem" / "SS200000135TL_D1_bin1_small.gem.gz"
    whole = read_gem(path)
    for chunk in (1000, 7777):  # chunk edges fall between records of the same DNB and gene
        part = read_gem(path, chunk=chunk)
        assert list(part.genes) == list(whole.genes)
        for name in ("gene", "x", "y", "count"):
            np.testing.assert_array_equal(getattr(part, name), getattr(whole, name))
    reader = GemReader(path, chunk=30000)  # blocks of 30,000 x 32 characters
    sizes = [len(c.count) for c in reader.chunks()]
    assert len(sizes) >= 2 and sum(sizes) == len(whole.count)  # 77,634 records in blocks, none read whole
    assert sorted(reader.names) == list(whole.genes)  # provisional codes cover every gene


def test_header_offsets_and_extent(tmp_path):
    p = _write(
        tmp_path / "o.gem", "#OffsetX=250\n#OffsetY=-40\ngeneID\tx\ty\tMIDCount\nA\t3\t9\t1\nB\t7\t5\t2\n", gz=False
    )
    gem = read_gem(p)
    assert gem.offset == (250, -40) and gem.extent() == (3, 7, 5, 9)


def test_density_labels_make_touching_nucleus_like_cells_on_the_real_gem(realdata):
    from scipy import ndimage

    gem = read_gem(realdata / "stereoseq-spateo-gem" / "SS200000135TL_D1_bin1_small.gem.gz")
    x0, x1, y0, y1 = gem.extent()
    labels = density_labels(gem, (x0, y0), (y1 - y0 + 1, x1 - x0 + 1))
    n = int(labels.max())
    assert 150 < n < 400 and set(np.unique(labels)) == set(range(n + 1))
    areas = np.bincount(labels.ravel())[1:]
    assert areas.max() <= 81  # a disc of radius 5 at most
    touching = (labels[:, 1:] != labels[:, :-1]) & (labels[:, 1:] > 0) & (labels[:, :-1] > 0)
    assert touching.any()
    for k in range(1, n + 1):  # every cell is one connected piece
        assert ndimage.label(labels == k)[1] == 1
    np.testing.assert_array_equal(labels, density_labels(gem, (x0, y0), (y1 - y0 + 1, x1 - x0 + 1)))
