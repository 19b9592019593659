"""Detectron2 jobs: kubetune's staging, checkpoints, metrics and report around Detectron2's own
model, data pipeline, trainers and evaluator. The only package that imports detectron2."""
