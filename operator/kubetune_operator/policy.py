"""What a FineTuneJob author may ask for, as the platform admin set it (pure; `reconciling`
fetches the Secret's labels): only allowed trainer images, and only credential Secrets that the
namespace's admin marked for kubetune. Anything else is refused before an object is created."""

from __future__ import annotations

from .settings import OperatorSettings
from .specs import FineTuneJob


def image_allowed(image: str, settings: OperatorSettings) -> bool:
    trainer = settings.trainer
    for entry in [trainer.image, *trainer.allowed_images]:
        if image == entry:
            return True
        if entry.startswith("sha256:") and image.endswith("@" + entry):
            return True
        if entry.endswith(("/", ":")) and image.startswith(entry):
            return True
    return False


def refusals(
    ftj: FineTuneJob,
    settings: OperatorSettings,
    secret_labels: dict[str, str] | None,
    token_labels: dict[str, str] | None = None,
) -> list[str]:
    """Why this job may not run (empty: it may). `secret_labels` are the labels of the Secret in
    spec.storage.credentialsSecret, `token_labels` those of spec.model.hfTokenSecret (None:
    there is no such Secret). Both must be marked for kubetune by the namespace's admin."""
    problems = []
    image = ftj.spec.image
    if image and not image_allowed(image, settings):
        allowed = ", ".join([settings.trainer.image, *settings.trainer.allowed_images])
        problems.append(f"spec.image {image!r} is not an allowed trainer image (allowed: {allowed})")
    secret = ftj.spec.storage.credentials_secret
    if secret and secret != settings.trainer.credentials_secret:
        problems += _unmarked("spec.storage.credentialsSecret", secret, secret_labels, settings)
    token = ftj.spec.model.hf_token_secret
    if token:
        problems += _unmarked("spec.model.hfTokenSecret", token, token_labels, settings)
    return problems


def _unmarked(field: str, secret: str, labels: dict[str, str] | None, settings: OperatorSettings) -> list[str]:
    label = settings.trainer.credentials_label
    if labels is None:
        return [f"{field} {secret!r} does not exist in this namespace"]
    if labels.get(label) != "true":
        return [f'{field} {secret!r} is not marked for kubetune: its namespace\'s admin must label it {label}="true"']
    return []
