// The sidecar config of the in-process benches (trace-path.mjs, paired.mjs): one route to one
// upstream, every port chosen by the kernel, tracing at 100 % to `collector`, no access log.
// `stages`: the route behind a kill switch and a circuit breaker, two rollback triggers watching
// it, and the access log sampled at 0.1 (every stage on, as `breakwater-stages` plus the log).
export function benchSidecarInput ({ stateDir, upstream, collector, stages = false }) {
  const input = {
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
  if (!stages) return input
  return {
    ...input,
    routes: [{ match: { pathPrefix: '/' }, upstream: 'app', killSwitch: 'benchFeature' }],
    featureFlags: { benchFeature: true },
    circuitBreakers: { app: { failureThreshold: 0.5, volumeThreshold: 20 } },
    rollbackTriggers: [
      { metric: 'error_rate', threshold: 0.05, window: '5m', action: 'notify' },
      { metric: 'p99_latency', threshold: 2000, window: '2m', action: 'notify' }
    ],
    logging: { level: 'info', accessLog: 0.1 }
  }
}
