"""Annotation formats as people export them, read into images and mask decoders every family
shares; broken samples are skipped and counted."""
