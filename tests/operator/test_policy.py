"""What a FineTuneJob author may ask for: the admin's allowed images and labelled Secrets."""

from __future__ import annotations

import pytest
from kubetune_operator.policy import image_allowed, refusals
from kubetune_operator.settings import OperatorSettings
from kubetune_operator.specs import FineTuneJob

from tests.factories import example_job

DEFAULT = "ghcr.io/kubetune/trainer:0.1.0"
SETTINGS = OperatorSettings(
    trainer={
        "image": DEFAULT,
        "allowed_images": ["registry.corp/ml/", "registry.corp/kt:", "sha256:" + "a" * 64],
        "credentials_secret": "platform-s3",
    }
)


@pytest.mark.parametrize(
    ("image", "allowed"),
    [
        (DEFAULT, True),
        ("registry.corp/ml/trainer:2", True),  # a prefix ending in /
        ("registry.corp/kt:nightly", True),  # a prefix ending in :
        ("evil.io/x@sha256:" + "a" * 64, True),  # a pinned digest
        ("registry.corp/mlx/trainer:2", False),  # a prefix is not a substring match
        ("ghcr.io/kubetune/trainer:0.1.0-evil", False),
        ("evil.io/x@sha256:" + "b" * 64, False),
        ("docker.io/library/python:3", False),
    ],
)
def test_images(image: str, allowed: bool) -> None:
    assert image_allowed(image, SETTINGS) is allowed


def job(image: str | None = None, secret: str | None = "team-s3") -> FineTuneJob:
    raw = example_job(namespace="ml")
    if image:
        raw["spec"]["image"] = image
    raw["spec"]["storage"]["credentialsSecret"] = secret
    return FineTuneJob.model_validate(raw)


def test_secrets_need_the_admins_label_and_every_refusal_is_named() -> None:
    assert refusals(job(), SETTINGS, {"kubetune.dev/credentials": "true"}) == []
    assert refusals(job(secret="platform-s3"), SETTINGS, None) == []  # the admin's own default
    assert refusals(job(secret=None), SETTINGS, None) == []
    unlabelled = refusals(job(), SETTINGS, {"kubetune.dev/credentials": "yes"})
    assert unlabelled == [
        "spec.storage.credentialsSecret 'team-s3' is not marked for kubetune: "
        'its namespace\'s admin must label it kubetune.dev/credentials="true"'
    ]
    both = refusals(job(image="docker.io/library/python:3"), SETTINGS, None)
    assert "spec.image 'docker.io/library/python:3' is not an allowed trainer image" in both[0]
    assert both[1] == "spec.storage.credentialsSecret 'team-s3' does not exist in this namespace"


def test_a_hub_token_secret_needs_the_same_mark() -> None:
    raw = example_job(namespace="ml")
    raw["spec"]["storage"]["credentialsSecret"] = None
    raw["spec"]["model"]["hfTokenSecret"] = "hub-token"
    ftj = FineTuneJob.model_validate(raw)
    assert refusals(ftj, SETTINGS, None, {"kubetune.dev/credentials": "true"}) == []
    assert refusals(ftj, SETTINGS, None, None) == [
        "spec.model.hfTokenSecret 'hub-token' does not exist in this namespace"
    ]
    assert refusals(ftj, SETTINGS, None, {}) == [
        "spec.model.hfTokenSecret 'hub-token' is not marked for kubetune: "
        'its namespace\'s admin must label it kubetune.dev/credentials="true"'
    ]
