# syntax=docker/dockerfile:1
#
# Two images from one file, both running the `agentjobs` console script:
#
#   docker build --target dispatcher -t ghcr.io/agentjobs/dispatcher:0.1.0 .   # dispatcher, trust, bridge
#   docker build --target agent      -t ghcr.io/agentjobs/agent:0.1.0 .        # the investigation Job
#
# The final stages hold only the Python runtime and a virtualenv with the
# project installed: no compiler, no pip, no package manager caches. They run
# as the numeric non-root user 65532 (what dispatcher/jobs/jobspec.py and the
# Deployments set as runAsUser), write nothing outside /tmp and so work with
# readOnlyRootFilesystem. Pin PYTHON_IMAGE by digest in release builds.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: install the project and its wheels into /opt/agentjobs ----------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/agentjobs
WORKDIR /src
COPY pyproject.toml README.md requirements.lock ./
COPY schemas/ schemas/
COPY dispatcher/ dispatcher/
COPY agent/ agent/
# Every dependency from the lock (hash-checked), then a regular (not editable) install of
# the project with the locked build tools: the code lives in the venv, not in /src.
# pip and setuptools leave the venv afterwards; the runtime never installs.
RUN /opt/agentjobs/bin/pip install --require-hashes -r requirements.lock \
 && /opt/agentjobs/bin/pip install --no-deps --no-build-isolation . \
 && /opt/agentjobs/bin/pip uninstall --yes pip setuptools wheel

# --- runtime: what both images share -----------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
RUN python -m pip uninstall --yes pip setuptools wheel \
 && groupadd --system --gid 65532 nonroot \
 && useradd --system --uid 65532 --gid 65532 --home-dir /nonexistent --no-create-home \
      --shell /usr/sbin/nologin nonroot
COPY --from=build /opt/agentjobs /opt/agentjobs
# Bytecode was compiled at install time; never try to write it at run time.
ENV PATH=/opt/agentjobs/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    TMPDIR=/tmp
WORKDIR /tmp
USER 65532:65532
ENTRYPOINT ["agentjobs"]

# --- the investigation Job (its command: agentjobs agent) --------------------
FROM runtime AS agent
CMD ["agent"]

# --- dispatcher, trust and bridge (their Deployments pick the subcommand) ----
FROM runtime AS dispatcher
EXPOSE 9464 9095
CMD ["dispatcher"]
