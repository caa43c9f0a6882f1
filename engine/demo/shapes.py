"""Procedural captioned pictures: one shape on a plain background, and the caption that describes it.

The training set of the packaged model and the ground truth of the quality gate (engine/demo/checker.py). Nothing is
downloaded: `random_scene(rng)` draws a scene, `render(scene, size)` draws it, `caption(scene)` describes it:

    "a large red circle on a blue background"
    "a small yellow triangle at the top left on a black background"

Colour words map to fixed RGB values (COLOURS), so anyone can check a picture against its caption.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {
    "red": (230, 25, 25), "green": (25, 170, 25), "blue": (25, 60, 230), "yellow": (240, 220, 30),
    "purple": (140, 40, 190), "orange": (245, 130, 30), "white": (245, 245, 245), "black": (15, 15, 15),
    "gray": (128, 128, 128),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.25, "large": 0.5}  # the shape's width as a fraction of the picture's side
# Where the shape's centre sits, as fractions of the side (x, y), and how a caption says it ("" = centre).
POSITIONS = {
    "center": ((0.5, 0.5), ""), "left": ((0.25, 0.5), "on the left"), "right": ((0.75, 0.5), "on the right"),
    "top": ((0.5, 0.25), "at the top"), "bottom": ((0.5, 0.75), "at the bottom"),
    "top left": ((0.25, 0.25), "at the top left"), "top right": ((0.75, 0.25), "at the top right"),
    "bottom left": ((0.25, 0.75), "at the bottom left"), "bottom right": ((0.75, 0.75), "at the bottom right"),
}
SUPERSAMPLE = 4  # drawn at 4x and reduced: smooth edges, as a generator's pictures have


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    background: str
    size: str
    position: str

    def __post_init__(self):
        for value, allowed in ((self.shape, SHAPES), (self.colour, COLOURS), (self.background, COLOURS),
                               (self.size, SIZES), (self.position, POSITIONS)):
            if value not in allowed:
                raise ValueError(f"{value!r} is not one of {', '.join(allowed)}")
        if self.colour == self.background:
            raise ValueError(f"the shape and the background are both {self.colour}")


def random_scene(rng: np.random.Generator) -> Scene:
    colour, background = rng.choice(list(COLOURS), size=2, replace=False)
    return Scene(shape=str(rng.choice(SHAPES)), colour=str(colour), background=str(background),
                 size=str(rng.choice(list(SIZES))), position=str(rng.choice(list(POSITIONS))))


def caption(scene: Scene) -> str:
    where = POSITIONS[scene.position][1]
    words = ["a", scene.size, scene.colour, scene.shape] + ([where] if where else [])
    return " ".join(words + ["on", "a", scene.background, "background"])


def parse_caption(text: str) -> Scene:
    """The scene a caption of this grammar describes (ValueError for anything else)."""
    words = text.lower().strip().split()
    if len(words) < 8 or words[0] != "a" or words[-3] != "a" or words[-1] != "background":
        raise ValueError(f"not a caption of the shapes grammar: {text!r}")
    size, colour, shape = words[1:4]
    where = " ".join(words[4:-4])
    positions = {phrase: name for name, (_, phrase) in POSITIONS.items()}
    if words[-4] != "on" or where not in positions:
        raise ValueError(f"not a caption of the shapes grammar: {text!r}")
    return Scene(shape=shape, colour=colour, background=words[-2], size=size, position=positions[where])


def render(scene: Scene, size: int) -> Image.Image:
    """The scene as a size x size RGB picture."""
    big = size * SUPERSAMPLE
    image = Image.new("RGB", (big, big), COLOURS[scene.background])
    draw = ImageDraw.Draw(image)
    (cx, cy), _ = POSITIONS[scene.position]
    half = SIZES[scene.size] * big / 2
    x, y = cx * big, cy * big
    fill = COLOURS[scene.colour]
    if scene.shape == "circle":
        draw.ellipse((x - half, y - half, x + half, y + half), fill=fill)
    elif scene.shape == "square":
        draw.rectangle((x - half, y - half, x + half, y + half), fill=fill)
    else:  # upright, as wide as it is tall
        draw.polygon([(x, y - half), (x + half, y + half), (x - half, y + half)], fill=fill)
    return image.resize((size, size), Image.Resampling.BOX)
