"""Batch rows that cannot sink a job (issue 42, item 7): any failure to read a row's picture is a bad row with
its line number; only regular files are read, never through a link, so a folder swapped for a link mid-read
cannot redirect a read outside the job's folder; pixels are bounded before decoding; manifest lines of the
wrong shape, or naming files outside the job's folder, are ignored with a warning; one job per output folder.
No model is loaded: rows are checked, and reruns prepared, by the code the job itself runs."""

import hashlib
import json
import logging
import os
import stat
import struct
import subprocess
import sys
import threading
import zlib

import pytest
from PIL import Image

from engine.batch_job import (MAX_PICTURE_PIXELS, Row, checked_rows, job_lock, prepare, row_picture,
                              write_sheet)
from engine.errors import EngineError

RED, BLUE = (255, 0, 0), (0, 0, 255)


@pytest.fixture
def jobs(tmp_path):
    """A job's folder with one good picture (red) in pictures/, and a blue one beside the folder."""
    folder = tmp_path / "jobs"
    (folder / "pictures").mkdir(parents=True)
    Image.new("RGB", (8, 8), RED).save(folder / "pictures" / "in.png")
    Image.new("RGB", (8, 8), BLUE).save(tmp_path / "outside.png")
    return folder


def bad_rows(jobs, rows):
    """checked_rows on a .jsonl of `rows` (each an edit of pictures/in.png unless it says otherwise): line -> reason."""
    path = jobs / "rows.jsonl"
    path.write_text("".join(json.dumps({"prompt": "x", **row}) + "\n" for row in rows))
    good, bad = checked_rows(path, strict=False, defaults=None)
    return {row.line: row.reason for row in bad}, [row.line for row in good]


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height (grey) and holds a few bytes of pixels: a bomb by its header."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def test_any_failure_to_read_a_picture_is_a_bad_row_with_its_line(jobs):
    Image.new("LAB", (8, 8)).save(jobs / "pictures" / "lab.tif")  # Pillow opens it, cannot convert it
    (jobs / "pictures" / "loop.png").symlink_to("loop.png")
    (jobs / "pictures" / "bomb.png").write_bytes(png_header(14000, 14000))  # Pillow's own bomb error
    reasons, good = bad_rows(jobs, [{"image": "pictures/in.png", "mask": "pictures/lab.tif"},
                                    {"image": "pictures/in\u0000.png"},
                                    {"image": "pictures/loop.png"},
                                    {"image": "pictures/bomb.png"},
                                    {"image": "pictures/in.png"}])
    assert good == [5] and sorted(reasons) == [1, 2, 3, 4]
    assert "cannot read mask 'pictures/lab.tif': ValueError" in reasons[1]
    assert "cannot read image" in reasons[2] and "null" in reasons[2]
    assert "'loop.png' is a link" in reasons[3]
    assert "cannot read image 'pictures/bomb.png'" in reasons[4]


def test_pixels_are_bounded_by_the_header_before_decoding(jobs):
    Image.new("L", (5000, 5000)).save(jobs / "pictures" / "big.png")  # 25 MP: decodes fine, over the bound
    (jobs / "pictures" / "claims.png").write_bytes(png_header(4097, 4096))  # refused before its data is read
    reasons, good = bad_rows(jobs, [{"image": "pictures/big.png"}, {"image": "pictures/claims.png"}])
    assert good == [] and "5000x5000: over the" in reasons[1] and "4097x4096: over the" in reasons[2]
    assert MAX_PICTURE_PIXELS == 4096 * 4096


def test_a_fifo_is_refused_not_waited_on(jobs):
    os.mkfifo(jobs / "pictures" / "fifo.png")
    found = {}
    reader = threading.Thread(target=lambda: found.update(bad_rows(jobs, [{"image": "pictures/fifo.png"}])[0]),
                              daemon=True)
    reader.start()
    reader.join(10)
    if reader.is_alive():  # the old code blocks in open(): free it before failing
        os.close(os.open(jobs / "pictures" / "fifo.png", os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("reading a FIFO as a picture hangs the job")
    assert "not a regular file" in found[1]


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="mknod needs root")
def test_a_device_is_refused(jobs):
    os.mknod(jobs / "pictures" / "zero.png", stat.S_IFCHR | 0o600, os.makedev(1, 5))  # /dev/zero: endless
    reasons, _ = bad_rows(jobs, [{"image": "pictures/zero.png"}])
    assert "not a regular file" in reasons[1]


def test_a_link_inside_the_folder_is_not_followed(jobs):
    (jobs / "pictures" / "also.png").symlink_to("in.png")  # even one that stays inside: links are not read
    (jobs / "linked").symlink_to(jobs / "pictures")
    reasons, _ = bad_rows(jobs, [{"image": "pictures/also.png"}, {"image": "linked/in.png"},
                                 {"image": "pictures/../pictures/in.png"}])
    assert "is outside the input's folder" in reasons[1] and "'also.png' is a link" in reasons[1]
    assert "'linked' is a link" in reasons[2] and 3 not in reasons  # .. that stays inside is fine


SWAP = """
import os, sys, time
pictures, outside = sys.argv[1], sys.argv[2]
real = pictures + ".real"
print("swapping", flush=True)
while True:
    os.rename(pictures, real)
    os.symlink(outside, pictures)
    time.sleep(0.0001)
    os.unlink(pictures)
    os.rename(real, pictures)
    time.sleep(0.0001)
"""


def test_a_folder_swapped_for_a_link_mid_read_never_redirects_the_read(jobs, tmp_path):
    """The issue's race: the row's folder is swapped for a link to a folder outside while rows are read. Every
    read gives the picture inside, or fails as a bad row; none gives the one outside."""
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    Image.new("RGB", (8, 8), BLUE).save(outside / "in.png")
    row = Row(1, {"prompt": "x", "image": "pictures/in.png"}, str(jobs))
    swapper = subprocess.Popen([sys.executable, "-c", SWAP, str(jobs / "pictures"), str(outside)],
                               stdout=subprocess.PIPE, text=True)  # its own process: truly alongside the reads
    colours = {"inside": 0, "outside": 0, "refused": 0}
    try:
        assert swapper.stdout.readline() == "swapping\n"
        for _ in range(3000):
            try:
                colour = row_picture(row, "image", "pictures/in.png").getpixel((0, 0))
                colours["inside" if colour == RED else "outside"] += 1
            except Exception:  # noqa: BLE001: any refusal (a link, a missing folder) is a bad row
                colours["refused"] += 1
    finally:
        swapper.terminate()
        swapper.wait()
    assert colours["inside"] > 0, colours
    assert colours["outside"] == 0, colours


# Manifests of an earlier run.

def _entry(row: int, image: int, file: str, data: bytes, prompt="x"):
    return {"row": row, "image": image, "file": file, "sha256": hashlib.sha256(data).hexdigest(),
            "input": {"prompt": prompt}, "request": {"prompt": prompt, "n": 1, "seed": 3}}


def test_manifest_lines_of_the_wrong_shape_are_ignored_with_a_warning(tmp_path, caplog):
    out = tmp_path / "out"
    (out / "images").mkdir(parents=True)
    Image.new("RGB", (8, 8), RED).save(out / "images" / "1-0.png")
    good = _entry(1, 0, "images/1-0.png", (out / "images" / "1-0.png").read_bytes())
    lines = [good, {**good, "row": 2, "request": "oops"}, [1, 2], {**good, "row": "3"}, {"row": 4},
             {**good, "row": 5, "file": "images/5-0.png", "request": {"prompt": "x", "n": "2"}}]
    (out / "manifest.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines) + '{"row": 6, "ima')
    rows = [Row(line, {"prompt": "x"}) for line in range(1, 7)]
    with caplog.at_level(logging.WARNING, logger="engine.batch_job"):
        plan = prepare(out, rows, None)  # crashed every rerun before
    assert [row.line for row in plan.todo] == [2, 3, 4, 5, 6] and plan.images_skipped == 1
    assert caplog.text.count("ignored") == 6


def test_a_manifest_naming_a_file_outside_the_job_is_neither_trusted_nor_read_into_the_sheet(tmp_path, caplog):
    out = tmp_path / "out"
    (out / "images").mkdir(parents=True)
    Image.new("RGB", (8, 8), RED).save(out / "images" / "1-0.png")
    secret = tmp_path / "secret.png"
    Image.new("RGB", (64, 64), BLUE).save(secret)
    good = _entry(1, 0, "images/1-0.png", (out / "images" / "1-0.png").read_bytes())
    planted = [_entry(2, 0, str(secret), secret.read_bytes()),  # absolute, its hash right
               _entry(3, 0, "images/../../secret.png", secret.read_bytes())]
    (out / "images" / "4-0.png").symlink_to(secret)  # a link under images/: not followed either
    planted.append(_entry(4, 0, "images/4-0.png", secret.read_bytes()))
    (out / "manifest.jsonl").write_text("".join(json.dumps(e) + "\n" for e in [good, *planted]))
    rows = [Row(line, {"prompt": "x"}) for line in range(1, 5)]
    with caplog.at_level(logging.WARNING, logger="engine.batch_job"):
        write_sheet(out, rows, tmp_path / "sheet.png")
    with Image.open(tmp_path / "sheet.png") as sheet:
        assert sheet.size[0] == 8 * 8  # eight columns of the 8 px picture alone: the 64 px secret is not in it
    assert "its file must be images/2-0.png" in caplog.text and "its file must be images/3-0.png" in caplog.text
    plan = prepare(out, rows, None)
    assert [row.line for row in plan.todo] == [2, 3, 4]  # none of them counts as made


# One job per output folder.

def test_a_second_job_on_the_same_output_folder_is_refused_while_the_first_holds_it(tmp_path):
    from engine.offline import batch

    out = tmp_path / "out"
    (tmp_path / "rows.txt").write_text("a red circle\n")
    with job_lock(out):
        with pytest.raises(EngineError, match=f"another batch job holds the output folder {out}"):
            batch(tmp_path / "rows.txt", out, model=str(tmp_path / "no-model"), progress=False)  # before loading
    with job_lock(out):  # released when the first ends
        pass
    with pytest.raises(EngineError) as refused:  # and a job that failed released it too
        batch(tmp_path / "rows.txt", out, model=str(tmp_path / "no-model"), progress=False)
    assert "another batch job" not in str(refused.value)
    with job_lock(out):
        pass
