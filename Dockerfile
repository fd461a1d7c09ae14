# The DeepBatch image used by docker-compose.yml: CUDA torch from the base image, DeepBatch on top.
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime
WORKDIR /app
COPY pyproject.toml README.md alembic.ini ./
COPY alembic ./alembic
COPY schema ./schema
COPY producer ./producer
COPY worker ./worker
RUN pip install --no-cache-dir .
CMD ["deepbatch", "--help"]
