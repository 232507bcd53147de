# The pod image of the example API: the supervisor's base image plus the user's code.
# Build the base first (repository root: `docker build -t cortex-batch-supervisor:0.1.0 .`), then
#
#   docker build -f deploy/wordcount.Dockerfile -t supervisor-wordcount:0.1.0 .
#
# The entry point stays the base image's `supervisor`: the manifests give it its command.
FROM cortex-batch-supervisor:0.1.0
COPY examples/wordcount/worker.py /app/worker.py
