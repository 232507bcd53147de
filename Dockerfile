# The supervisor's base image: build your pod's image FROM it (docs/deploy.md).
#
#   docker build -t cortex-batch-supervisor:0.1.0 .
#   docker build --build-arg EXTRAS=redis,fast -t cortex-batch-supervisor:0.1.0 .   # with uvloop
#
# The supervisor is the container's PID 1, with no init in front of it: it handles SIGTERM,
# SIGINT and SIGHUP itself and reaps every zombie re-parented to it (docs/deploy.md, "PID 1").

FROM python:3.12-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY supervisor ./supervisor
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.12-slim-bookworm
# The extras to install: redis (the shared queue of `serve --queue` and `worker`); add fast
# for uvloop.
ARG EXTRAS=redis
ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SUPERVISOR_ROOT=/
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir "$(ls /wheels/*.whl)[${EXTRAS}]" \
    && rm -rf /wheels
# An unprivileged user owns what the supervisor writes: /cortex (the job spec and its own
# state) and /mnt (the containers' shared folder) of a pod's root; /var/lib/supervisor, the
# root of `serve --root /var/lib/supervisor` (its queue file, each job's files); and /app,
# for your code. Nothing the supervisor does needs root; switch to `USER root` in your own
# Dockerfile to install packages, and back to `USER 10001:10001` after.
RUN groupadd --system --gid 10001 supervisor \
    && useradd --system --uid 10001 --gid 10001 --home-dir /app --no-create-home \
       --shell /usr/sbin/nologin supervisor \
    && mkdir -p /cortex /mnt /var/lib/supervisor /app \
    && chown 10001:10001 /cortex /mnt /var/lib/supervisor /app
USER 10001:10001
WORKDIR /app
# 8888: `serve` (the job API and its /healthz, /status, /metrics);
# 9090: the admin endpoints of `worker --admin` (and `run --admin`).
EXPOSE 8888 9090
ENTRYPOINT ["supervisor"]
CMD ["--help"]
