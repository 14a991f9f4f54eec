"""Mutual knowledge between CLIP's visual and textual concepts (Sammani & Deligiannis, NeurIPS 2024).

Prominent regions by graph decomposition, visual concepts (PCA / K-means parts embedded by visual
prompting, matched to descriptors by Sinkhorn), textual concepts of the prediction, their mutual
information, MI dynamics and AUC, Deletion/Insertion/AccDrop/AccInc and CorLoc.
"""

from clip_lens_plugins.mutual_knowledge.analysis import ImageConcepts, MethodRun, MutualKnowledge, MutualKnowledgeResult
from clip_lens_plugins.mutual_knowledge.compare import MutualKnowledgeComparison, compare_files, compare_results
from clip_lens_plugins.mutual_knowledge.data import ConceptData, folder_data, shapes_world_data
from clip_lens_plugins.mutual_knowledge.descriptors import (
    DescriptorBank, load_descriptors, shapes_world_descriptors, sinkhorn, textual_concepts, visual_concepts,
)
from clip_lens_plugins.mutual_knowledge.evaluation import ExplanationEval, evaluate_explanations, explanation_curves
from clip_lens_plugins.mutual_knowledge.information import MI_VARIANTS, auc, mi_bank, mi_dynamics, mi_paper
from clip_lens_plugins.mutual_knowledge.regions import concept_parts, corloc, prominent_region, region_embeddings
from clip_lens_plugins.mutual_knowledge.report import write_report

__all__ = [
    "ConceptData", "DescriptorBank", "ExplanationEval", "ImageConcepts", "MI_VARIANTS", "MethodRun", "MutualKnowledge",
    "MutualKnowledgeComparison", "MutualKnowledgeResult", "auc", "compare_files", "compare_results", "concept_parts",
    "corloc", "evaluate_explanations", "explanation_curves", "folder_data", "load_descriptors", "mi_bank", "mi_dynamics",
    "mi_paper", "prominent_region", "region_embeddings", "shapes_world_data", "shapes_world_descriptors", "sinkhorn",
    "textual_concepts", "visual_concepts", "write_report",
]
