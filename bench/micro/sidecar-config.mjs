// The sidecar config of the in-process tracing benches (trace-path.mjs, paired.mjs): one route to
// one upstream, every port chosen by the kernel, tracing at 100 % to `collector`, no access log.
export function benchSidecarInput ({ stateDir, upstream, collector }) {
  return {
    service: 'bench',
    version: 'bench',
    stateDir,
    listen: { proxy: { host: '127.0.0.1', port: 0 }, ops: { host: '127.0.0.1', port: 0 }, admin: { host: '127.0.0.1', port: 0 } },
    upstreams: { app: { url: upstream } },
    routes: [{ match: { pathPrefix: '/' }, upstream: 'app' }],
    logging: { level: 'info', accessLog: false },
    tracing: { otlpEndpoint: collector, sampleRatio: 1 },
    shutdown: { drainDelayMs: 0, timeoutMs: 2000 }
  }
}
