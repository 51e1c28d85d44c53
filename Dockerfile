# Breakwater container image.
#
#   docker build -t breakwater .
#   docker run --rm -p 14001:14001 -p 14020:14020 breakwater
#
# Ports: 14001 proxy, 14020 ops (GET /live, /ready, /metrics), 14000 admin.
# Mount your own config over /app/config/breakwater.yaml, or pass another path and keep
# the CMD's Node flag:
#   docker run ... breakwater node --max-semi-space-size=8 dist/cli.js start --config /etc/bw.yaml

# The base image, pinned by digest: a tag moves, so without the digest two builds of the
# same commit can run on different Node and Debian bytes. This is node:24-bookworm-slim
# (Node 24.18.0) as published in mid-2026. To bump it:
#   docker buildx imagetools inspect node:24-bookworm-slim   # the "Digest:" line (the
#                                                            # multi-platform index)
# put that digest here, rebuild, and run the tests (`bash .ci/run` runs them on Node 24 too).
ARG NODE_IMAGE=node:24-bookworm-slim@sha256:6f7b03f7c2c8e2e784dcf9295400527b9b1270fd37b7e9a7285cf83b6951452d

############################
# build: compile TypeScript -> dist/
############################
FROM ${NODE_IMAGE} AS build
WORKDIR /app

# Dependencies first so this layer is cached until the lockfile changes.
COPY package.json package-lock.json ./
RUN npm ci --no-audit --no-fund

COPY tsconfig.json ./
COPY scripts ./scripts
COPY src ./src
RUN npm run build

############################
# runtime: production dependencies + compiled output only
############################
FROM ${NODE_IMAGE} AS runtime

ENV NODE_ENV=production
# The default config keeps its state in ${BREAKWATER_STATE_DIR:-./.breakwater};
# point it at a writable directory outside the read-only app tree.
ENV BREAKWATER_STATE_DIR=/var/lib/breakwater
WORKDIR /app

COPY package.json package-lock.json ./
RUN npm ci --omit=dev --ignore-scripts --no-audit --no-fund \
 && npm cache clean --force

COPY --from=build /app/dist ./dist
COPY config ./config

# The code stays root-owned and read-only for the service user; only the
# state directory is writable (mount a volume there to keep it across
# containers). `node` (uid/gid 1000) ships with the base image; the numeric
# form lets Kubernetes' runAsNonRoot verify it.
RUN mkdir -p /var/lib/breakwater && chown 1000:1000 /var/lib/breakwater
USER 1000:1000

EXPOSE 14001 14020 14000

# No HEALTHCHECK: each one would start a second Node process inside the container
# every few seconds (about 50 MiB and 0.1 s of CPU each on a Node 20 test machine),
# in the same memory limit as the proxy. Kubernetes probes GET
# /live and /ready on the ops port instead (deploy/kubernetes/); elsewhere, point
# your orchestrator's HTTP check at http://HOST:14020/ready.

# Exec form, no npm and no shell in between: node is PID 1 and receives
# SIGTERM directly, which starts Breakwater's graceful drain.
#
# --max-semi-space-size=8: V8's young generation at most 16 MiB, whatever the
# container's memory limit. Left to itself, Node 24 sizes it from the memory it
# sees: up to 128 MiB with no limit (the sidecar then holds about 230 MiB under
# load, 290 MiB with every feature on) and 4 MiB under a 256 MiB limit, where
# objects of requests in flight are promoted and collected again at about 40 %
# more CPU per request. Measured in bench/README.md (2026-12-06).
CMD ["node", "--max-semi-space-size=8", "dist/cli.js", "start", "--config", "config/breakwater.yaml"]
