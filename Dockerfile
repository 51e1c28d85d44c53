# Breakwater container image.
#
#   docker build -t breakwater .
#   docker run --rm -p 14001:14001 -p 14020:14020 breakwater
#
# Ports: 14001 proxy, 14020 ops (GET /health), 14000 admin.
# Mount your own config over /app/config/breakwater.yaml (or pass another
# path: `docker run ... breakwater node dist/cli.js start --config /etc/bw.yaml`).

############################
# build: compile TypeScript -> dist/
############################
FROM node:24-bookworm-slim AS build
WORKDIR /app

# Dependencies first so this layer is cached until the lockfile changes.
COPY package.json package-lock.json ./
RUN npm ci --no-audit --no-fund

COPY tsconfig.json ./
COPY src ./src
RUN npm run build

############################
# runtime: production dependencies + compiled output only
############################
FROM node:24-bookworm-slim AS runtime

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

# No curl/wget in the slim image: probe /health with node's built-in fetch.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["node", "-e", "fetch('http://127.0.0.1:14020/health').then(r => process.exit(r.ok ? 0 : 1), () => process.exit(1))"]

# Exec form, no npm and no shell in between: node is PID 1 and receives
# SIGTERM directly, which starts Breakwater's graceful drain.
CMD ["node", "dist/cli.js", "start", "--config", "config/breakwater.yaml"]
