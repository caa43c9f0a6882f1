"""Edit a picture: image-to-image and inpainting, with the packaged model or a cascade of your own.

    python examples/edit_picture.py                          # the packaged shapes model: makes its own picture
    python examples/edit_picture.py PHOTO.png MASK.png "a red sofa" --model /models/IF-I-XL-v1.0 /models/IF-II-L-v1.0

Writes edit-sheet.png: the picture, its mask (white: redrawn), the inpainting and the image-to-image result.
"""

import argparse

from PIL import Image, ImageDraw

import engine

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("picture", nargs="?", help="the picture to edit (default: one the packaged model draws)")
parser.add_argument("mask", nargs="?", help="white where the picture is redrawn (default: its right half)")
parser.add_argument("prompt", nargs="?", default="a large red square on a blue background")
parser.add_argument("--model", nargs="+", default=None, help="stage directories (default: the packaged model)")
parser.add_argument("--out", default="edit-sheet.png")
args = parser.parse_args()

pipe = engine.load(*args.model) if args.model else engine.default_pipeline()
if args.picture:  # "" too: the default
    picture = Image.open(args.picture).convert("RGB")
else:
    picture = pipe.generate("a large red circle on a blue background", seed=0)[0]
if args.mask:  # "" too: the default
    mask = Image.open(args.mask).convert("L")
else:
    mask = Image.new("L", picture.size, 0)
    ImageDraw.Draw(mask).rectangle((picture.size[0] // 2, 0, picture.size[0], picture.size[1]), fill=255)

inpainted = pipe.generate(args.prompt, image=picture, mask_image=mask, seed=1)[0]  # strength 1.0 at stage I
restyled = pipe.generate(args.prompt, image=picture, strength=0.6, seed=1)[0]  # a lighter touch: 0.6
tiles = [picture, mask.convert("RGB"), inpainted, restyled]
sheet = Image.new("RGB", (sum(t.size[0] for t in tiles), max(t.size[1] for t in tiles)), "white")
x = 0
for tile in tiles:
    sheet.paste(tile, (x, 0))
    x += tile.size[0]
sheet.save(args.out)
print(f"wrote {args.out}: picture, mask, inpainted ({args.prompt!r}), image-to-image at strength 0.6")
