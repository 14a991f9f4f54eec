"""Neurons: second-order effects of MLP neurons named with sparse text (Gandelsman, Efros & Steinhardt,
ICLR 2025), their shapes-world ground truth, and SpLiCE's sparse concept decomposition of image
embeddings (Bhalla et al., NeurIPS 2024)."""

from clip_lens_plugins.neurons.analysis import NeuronRow, Neurons, NeuronsResult
from clip_lens_plugins.neurons.directions import RankOne, rank_one
from clip_lens_plugins.neurons.naming import TextCodes, named_neurons, names_phrase, text_codes, world_names
from clip_lens_plugins.neurons.shapes import TRUTH_SEEDS, NeuronTruthResult, shapes_world_truth
from clip_lens_plugins.neurons.splice import SpLiCE, SpliceResult, concept_truth

__all__ = ["NeuronRow", "NeuronTruthResult", "Neurons", "NeuronsResult", "RankOne", "SpLiCE", "SpliceResult", "TRUTH_SEEDS",
           "TextCodes", "concept_truth", "named_neurons", "names_phrase", "rank_one", "shapes_world_truth", "text_codes",
           "world_names"]
