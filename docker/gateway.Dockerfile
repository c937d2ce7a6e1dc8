# The gateway: `nanoserve gateway`, prefix-cache-aware routing. No torch (tokenizers only).
#   docker build -f docker/gateway.Dockerfile -t ghcr.io/nanoserve/gateway:0.1.0 .
FROM python:3.12-slim-bookworm AS build
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml ./
COPY nanoserve_pkg nanoserve_pkg
COPY common common
COPY kernels kernels
COPY engine_pod engine_pod
COPY gateway gateway
COPY operator operator
RUN pip install './[gateway]'

FROM python:3.12-slim-bookworm
RUN groupadd --gid 1000 nanoserve \
    && useradd --uid 1000 --gid 1000 --no-create-home --shell /usr/sbin/nologin nanoserve
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 HOME=/tmp HF_HOME=/tmp/huggingface
USER 1000:1000
EXPOSE 8080
ENTRYPOINT ["nanoserve", "gateway"]
CMD ["--port", "8080"]
