"""The embedded world: ShapeWorld (procedural images of shapes with compositional captions) and ShapeEval
(a rule-based GenEval-like verifier of those captions on generated images), so alignment runs end to end
on a laptop CPU. Pure numpy/torch; importing this package does not import the verifier's reward base
until :mod:`mmalign.embedded.shapeeval` is used.
"""
from .shapeworld import (
    BACKGROUND,
    CATEGORIES,
    COLORS,
    RELATIONS,
    SHAPES,
    SIZES,
    Example,
    Group,
    Obj,
    Relation,
    Requirements,
    Scene,
    ShapeWorldDataset,
    build_prompt_suites,
    example_at,
    generate,
    is_heldout,
    load_prompt_suite,
    prompt_suite_path,
    render,
    sample_example,
)

__all__ = [
    "BACKGROUND",
    "CATEGORIES",
    "COLORS",
    "RELATIONS",
    "SHAPES",
    "SIZES",
    "Example",
    "Group",
    "Obj",
    "Relation",
    "Requirements",
    "Scene",
    "ShapeWorldDataset",
    "build_prompt_suites",
    "example_at",
    "generate",
    "is_heldout",
    "load_prompt_suite",
    "prompt_suite_path",
    "render",
    "sample_example",
    # lazily from .shapeeval
    "parse_prompt",
    "detect_objects",
    "evaluate",
    "ShapeEvalReward",
    "ShapeEvalResult",
    "Detection",
    "load_shapeeval",
    "tiny_shapeeval",
    "Thresholds",
]

_LAZY = {"parse_prompt", "detect_objects", "evaluate", "ShapeEvalReward", "ShapeEvalResult", "Detection", "load_shapeeval", "tiny_shapeeval", "Thresholds"}


def __getattr__(name: str):
    if name in _LAZY:
        from . import shapeeval

        return getattr(shapeeval, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
