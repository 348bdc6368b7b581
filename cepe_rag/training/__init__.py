"""Training CEPE cross-attention for a frozen decoder: corpus -> examples -> losses -> adapter."""

from cepe_rag.training.corpus import Article, load_articles
from cepe_rag.training.examples import STAGES, ExampleBuilder, TrainingExample, build_examples
from cepe_rag.training.run import add_teacher, run_training
from cepe_rag.training.trainer import TrainConfig, train

__all__ = ["STAGES", "Article", "ExampleBuilder", "TrainConfig", "TrainingExample", "add_teacher", "build_examples",
           "load_articles", "run_training", "train"]
