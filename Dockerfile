# kubetune operator image: the torch-free core (specs, kopf operator, CLI), no torch.
FROM python:3.11-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    PATH=/opt/kubetune/.venv/bin:$PATH

RUN pip install --no-cache-dir "uv==0.13.9"
WORKDIR /opt/kubetune
COPY pyproject.toml uv.lock README.md ./
COPY cli/kubetune cli/kubetune
COPY operator/kubetune_operator operator/kubetune_operator
COPY trainer-image/kubetune_trainer trainer-image/kubetune_trainer
RUN uv sync --frozen --no-editable --extra operator && rm -rf /root/.cache

RUN useradd --uid 1000 --create-home kubetune
USER 1000
ENTRYPOINT ["kubetune"]
CMD ["operator"]
