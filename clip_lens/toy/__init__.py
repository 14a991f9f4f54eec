"""The shapes world: a ground-truth dataset of coloured shapes and the small CLIP trained on it."""

from clip_lens.toy.evaluate import BindingResult, ZeroShotResult, binding_accuracy, shapes_world_version, zero_shot_accuracy
from clip_lens.toy.texts import DESCRIPTORS, attribute_bank, text_bank, vocabulary
from clip_lens.toy.tokenizer import WordTokenizer
from clip_lens.toy.world import ATTRIBUTES, VALUES, Scene, ShapeObject, ShapesWorld, attribute_prompt, batch_images, phrase

__all__ = [
    "ATTRIBUTES", "BindingResult", "DESCRIPTORS", "Scene", "ShapeObject", "ShapesWorld", "VALUES", "WordTokenizer",
    "ZeroShotResult", "attribute_bank", "attribute_prompt", "batch_images", "binding_accuracy", "shapes_world_version", "phrase", "text_bank", "vocabulary", "zero_shot_accuracy",
]
