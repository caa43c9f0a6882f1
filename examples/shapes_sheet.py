"""The README's picture: the packaged model's drawings of six captions, side by side, each judged by the checker.

    python examples/shapes_sheet.py docs/shapes.png
"""

import sys

from PIL import Image

import engine
from engine.demo.checker import judge
from engine.demo.shapes import parse_caption

CAPTIONS = [
    "a large green square on a white background",
    "a large red circle on a blue background",
    "a small yellow triangle at the top left on a black background",
    "a large purple triangle on a gray background",
    "a small white circle at the bottom right on a orange background",
    "a large blue square on the left on a yellow background",
]

images = engine.generate(CAPTIONS, seed=0)
side = images[0].size[0]
sheet = Image.new("RGB", (side * len(images), side))
for i, (text, image) in enumerate(zip(CAPTIONS, images)):
    sheet.paste(image, (i * side, 0))
    print(f"{'right' if judge(image, parse_caption(text))['all'] else 'WRONG'}: {text}")
sheet.save(sys.argv[1] if len(sys.argv) > 1 else "shapes.png")
