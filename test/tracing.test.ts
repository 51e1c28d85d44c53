/**
 * Tracing end to end over real sockets (SPEC §18): a real upstream, a real sidecar and a real
 * local OTLP/HTTP receiver that decodes what OpenTelemetry's exporter sends.
 */
import t, { type Test } from 'tap'
import { createRequire } from 'node:module'
import { once } from 'node:events'
import { startTestSidecar, startCaptured, testSidecarInput, oneRoute } from './helpers/sidecar.js'
import { startProcess } from './helpers/process.js'
import { startUpstream, status, type TestUpstream } from './helpers/upstream.js'
import { startOtlpReceiver, type OtlpReceiver, type OtlpSpan } from './helpers/otlp.js'
import { send, eventually } from './helpers/http.js'
import { metricValue } from './helpers/metrics.js'
import { resolveConfig, ConfigError } from '../src/config/load.js'
import { createPki, type Pki } from './helpers/certificates.js'
import { mkdtempSync, renameSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

const TRACE = '4bf92f3577b34da6a3ce929d0e0e4736'
const PARENT = '00f067aa0ba902b7'
const HEX16 = /^[0-9a-f]{16}$/
const HEX32 = /^[0-9a-f]{32}$/

/** Modules of the OpenTelemetry SDK and exporter this process has loaded. */
function loadedOpenTelemetry (): string[] {
  const cache = createRequire(import.meta.url).cache
  return Object.keys(cache).filter((p) => /@opentelemetry[\\/](exporter-trace-otlp-(?:http|proto)|sdk-trace|otlp-exporter-base|otlp-transformer|resources)[\\/]/.test(p))
}

function tracing (receiver: OtlpReceiver, extra: Record<string, unknown> = {}): Record<string, unknown> {
  return { tracing: { otlpEndpoint: receiver.url, sampleRatio: 1, serviceName: 'checkout', batch: { delayMs: 10 }, ...extra } }
}

async function spansArrive (receiver: OtlpReceiver, n: number): Promise<OtlpSpan[]> {
  if (!await eventually(() => receiver.spans.length >= n, 30_000)) throw new Error(`${receiver.spans.length} spans arrived, expected ${n}`)
  return receiver.spans
}

/** The `traceparent` the upstream received with its `i`th request. */
function forwarded (upstream: { received: Array<{ headers: Record<string, string | string[] | undefined> }> }, i: number): string[] {
  return String(upstream.received[i]?.headers.traceparent ?? '').split('-')
}

t.test('without tracing: nothing of OpenTelemetry is loaded, traceparent passes untouched, the log names the caller\'s trace', async (t) => {
  const upstream = await startUpstream()
  t.teardown(upstream.close)
  const s = await startTestSidecar(t, oneRoute(upstream.url))
  const incoming = `00-${TRACE}-${PARENT}-01`
  const r = await send(s.proxy, '/a', { headers: { traceparent: incoming, tracestate: 'vendor=x' } })
  t.equal(r.status, 200)
  t.equal(upstream.received[0]?.headers.traceparent, incoming, 'the upstream sees the caller\'s traceparent as it was')
  t.equal(upstream.received[0]?.headers.tracestate, 'vendor=x')
  await send(s.proxy, '/b')
  t.ok(await eventually(() => s.logs.filter((l) => l.msg === 'request').length === 2))
  const [withTrace, without] = s.logs.filter((l) => l.msg === 'request')
  t.equal(withTrace?.trace_id, TRACE)
  t.equal(withTrace?.span_id, PARENT, 'the span the upstream parents on')
  t.notOk('trace_id' in (without ?? {}), 'no trace to name when none arrived and tracing is off')
  t.equal(upstream.received[1]?.headers.traceparent, undefined, 'none invented')
  t.same(loadedOpenTelemetry(), [], 'no OpenTelemetry SDK or exporter module loaded')
  t.notOk((await send(s.ops, '/metrics')).body.includes('breakwater_trace_spans'), 'no tracing metrics')
})

t.test('an incoming traceparent is continued: its trace, our span as its child, the upstream as ours', async (t) => {
  const receiver = await startOtlpReceiver()
  t.teardown(receiver.close)
  const upstream = await startUpstream()
  t.teardown(upstream.close)
  // sampleRatio 0: the caller's sampled flag decides (parent-based), not the ratio.
  const s = await startTestSidecar(t, { ...oneRoute(upstream.url, { name: 'api', match: { pathPrefix: '/api/' } }), ...tracing(receiver, { sampleRatio: 0 }) })
  t.ok(loadedOpenTelemetry().length > 0, 'the exporter is loaded once tracing is configured')
  const r = await send(s.proxy, '/api/orders?id=7', { headers: { traceparent: `00-${TRACE}-${PARENT}-01`, tracestate: 'vendor=x', 'user-agent': 'probe/1.0', host: 'shop.example:8080' } })
  t.equal(r.status, 200)
  const [span] = await spansArrive(receiver, 1)
  if (span === undefined) return
  t.equal(receiver.requests[0]?.path, '/v1/traces', 'posted to the traces path of the endpoint')
  t.match(receiver.requests[0]?.contentType, /^application\/x-protobuf/, 'binary protobuf, OpenTelemetry\'s default encoding')
  t.equal(span.traceId, TRACE, 'the caller\'s trace')
  t.equal(span.parentSpanId, PARENT, 'our span is the child of the caller\'s')
  t.match(span.spanId, HEX16)
  t.not(span.spanId, PARENT)
  t.equal(span.kind, 2, 'SPAN_KIND_SERVER')
  t.equal(span.name, 'GET /api/*')
  t.notOk(span.status.code, 'a 200 leaves the status unset')
  t.same(span.attributes, {
    'http.request.method': 'GET',
    'url.path': '/api/orders',
    'url.query': 'id=7',
    'url.scheme': 'http',
    'server.address': 'shop.example',
    'server.port': 8080,
    'network.protocol.version': '1.1',
    'breakwater.outcome': 'ok',
    'http.response.status_code': 200,
    'http.route': '/api/*',
    'client.address': '127.0.0.1',
    'user_agent.original': 'probe/1.0',
    'breakwater.route': 'api',
    'breakwater.upstream': 'app'
  })
  t.equal(span.resource['service.name'], 'checkout')
  t.equal(span.resource['service.version'], '1.0.0')
  t.ok(BigInt(span.endTimeUnixNano) >= BigInt(span.startTimeUnixNano), 'ends after it starts')
  t.ok(Math.abs(Number(BigInt(span.startTimeUnixNano) / 1_000_000n) - Date.now()) < 3_600_000, 'times are Unix epoch')

  const [version, traceId, parentId, flags] = forwarded(upstream, 0)
  t.equal(version, '00')
  t.equal(traceId, TRACE, 'the upstream continues the same trace')
  t.equal(parentId, span.spanId, 'the upstream\'s parent is the sidecar\'s server span')
  t.equal(flags, '01', 'sampled')
  t.equal(upstream.received[0]?.headers.tracestate, 'vendor=x', 'tracestate passes through')
  t.equal(upstream.received[0]?.rawHeaders.filter((h) => h.toLowerCase() === 'traceparent').length, 1, 'one traceparent')

  t.ok(await eventually(() => s.logs.some((l) => l.msg === 'request')))
  const line = s.logs.find((l) => l.msg === 'request')
  t.equal(line?.trace_id, TRACE)
  t.equal(line?.span_id, span.spanId, 'the log line names the exported span')
})

t.test('behind trusted proxies the span\'s client.address is the client the access log names, the proxy its network.peer.address', async (t) => {
  const receiver = await startOtlpReceiver()
  t.teardown(receiver.close)
  const upstream = await startUpstream()
  t.teardown(upstream.close)
  const s = await startTestSidecar(t, {
    ...oneRoute(upstream.url),
    ...tracing(receiver),
    listen: { proxy: { host: '127.0.0.1', port: 0, trustedProxies: ['127.0.0.0/8'] }, ops: { host: '127.0.0.1', port: 0 }, admin: { host: '127.0.0.1', port: 0 } }
  })
  t.equal((await send(s.proxy, '/a', { headers: { 'x-forwarded-for': '203.0.113.9, 127.0.0.2' } })).status, 200)
  t.equal((await send(s.proxy, '/b')).status, 200)
  const spans = await spansArrive(receiver, 2)
  t.ok(await eventually(() => s.logs.filter((l) => l.msg === 'request').length === 2))
  const forwardedSpan = spans.find((x) => x.attributes['url.path'] === '/a')
  const directSpan = spans.find((x) => x.attributes['url.path'] === '/b')
  const forwardedLine = s.logs.find((l) => l.msg === 'request' && l['url.path'] === '/a')
  const directLine = s.logs.find((l) => l.msg === 'request' && l['url.path'] === '/b')
  t.equal(forwardedSpan?.attributes['client.address'], '203.0.113.9', 'the right-most untrusted x-forwarded-for entry')
  t.equal(forwardedSpan?.attributes['network.peer.address'], '127.0.0.1', 'the proxy that connected')
  t.equal(forwardedLine?.['client.address'], '203.0.113.9', 'the access line names the same client')
  t.equal(forwardedLine?.['network.peer.address'], '127.0.0.1', 'and the same peer')
  t.equal(directSpan?.attributes['client.address'], '127.0.0.1', 'without x-forwarded-for the peer is the client')
  t.notOk('network.peer.address' in (directSpan?.attributes ?? {}), 'and is not named twice')
  t.equal(directLine?.['client.address'], '127.0.0.1')
  t.notOk('network.peer.address' in (directLine ?? {}))
})

t.test('protocol http/json: the same span in OTLP\'s JSON encoding', async (t) => {
  const receiver = await startOtlpReceiver()
  t.teardown(receiver.close)
  const upstream = await startUpstream()
  t.teardown(upstream.close)
  const s = await startTestSidecar(t, { ...oneRoute(upstream.url, { name: 'api', match: { pathPrefix: '/api/' } }), ...tracing(receiver, { protocol: 'http/json' }) })
  t.equal((await send(s.proxy, '/api/orders?X-Goog-Signature=abc&page=2&sig=xyz', { headers: { traceparent: `00-${TRACE}-${PARENT}-01` } })).status, 200)
  const [span] = await spansArrive(receiver, 1)
  t.match(receiver.requests[0]?.contentType, /^application\/json/)
  t.equal(span?.attributes['url.query'], 'X-Goog-Signature=REDACTED&page=2&sig=REDACTED', 'the query, signatures of pre-signed URLs redacted')
  t.equal(span?.traceId, TRACE)
  t.equal(span?.parentSpanId, PARENT)
  t.equal(span?.spanId, forwarded(upstream, 0)[2], 'the upstream\'s parent is the exported span')
  t.equal(span?.name, 'GET /api/*')
  t.equal(span?.attributes['http.response.status_code'], 200)
  t.equal(span?.resource['service.name'], 'checkout')
})

t.test('the bundled command, as shipped, exports spans in either encoding', async (t) => {
  // The command is one bundle whose exporter loads with import(): a chunk that names no exports
  // once left the exporter without node:http's Agent, every batch failing.
  const upstream = await startUpstream()
  t.teardown(upstream.close)
  for (const protocol of ['http/protobuf', 'http/json']) {
    const receiver = await startOtlpReceiver()
    t.teardown(receiver.close)
    const sidecar = await startProcess(t, { ...oneRoute(upstream.url, { name: 'api' }), ...tracing(receiver, { protocol }) })
    t.equal((await send(sidecar.proxy, `/orders/${protocol}`)).status, 200, `${protocol}: answered`)
    const [span] = await spansArrive(receiver, 1)
    t.equal(span?.attributes['url.path'], `/orders/${protocol}`, `${protocol}: its span arrived`)
    t.equal(sidecar.lines.filter((l) => l.event === 'tracing_export').length, 0, `${protocol}: no export failure logged`)
  }
})

t.test('an absent or invalid traceparent starts a trace; the ratio samples roots', async (t) => {
  const receiver = await startOtlpReceiver()
  t.teardown(receiver.close)
  const upstream = await startUpstream()
  t.teardown(upstream.close)
  const s = await startTestSidecar(t, { ...oneRoute(upstream.url, { name: 'all' }), ...tracing(receiver) })
  const invalid = [
    undefined,
    `00-${'0'.repeat(32)}-${PARENT}-01`, // all-zero trace id
    `00-${TRACE}-${'0'.repeat(16)}-01`, // all-zero parent id
    `ff-${TRACE}-${PARENT}-01`, // version ff
    `00-${TRACE.toUpperCase()}-${PARENT}-01`, // upper case
    `00-${TRACE}-${PARENT}-01-extra` // version 00 has no more fields
  ]
  for (const tp of invalid) {
    const r = await send(s.proxy, '/x', tp === undefined ? {} : { headers: { traceparent: tp } })
    t.equal(r.status, 200)
  }
  const spans = await spansArrive(receiver, invalid.length)
  for (let i = 0; i < invalid.length; i++) {
    const [, traceId, parentId, flags] = forwarded(upstream, i)
    const span = spans.find((x) => x.spanId === parentId)
    t.ok(span, `request ${i}: the upstream's parent is an exported span`)
    t.equal(span?.traceId, traceId, `request ${i}: same trace`)
    t.match(traceId, HEX32)
    t.not(traceId, TRACE, `request ${i}: a new trace`)
    t.equal(span?.parentSpanId, '', `request ${i}: a root span`)
    t.equal(flags, '01')
    t.equal(span?.name, 'GET /*', 'a prefix route is named by its template')
  }
  t.equal(new Set(spans.map((x) => x.traceId)).size, invalid.length, 'one new trace each')
})

t.test('a trace the sidecar starts carries no tracestate of the caller (W3C: without a valid traceparent it is discarded); a continued one keeps it', async (t) => {
  const receiver = await startOtlpReceiver()
  t.teardown(receiver.close)
  const upstream = await startUpstream()
  t.teardown(upstream.close)
  const s = await startTestSidecar(t, { ...oneRoute(upstream.url), ...tracing(receiver) })
  const cases: Array<[Record<string, string>, string | undefined]> = [
    [{ tracestate: 'congo=t61rcWkgMzE' }, undefined], // no traceparent at all
    [{ traceparent: `00-${TRACE.toUpperCase()}-${PARENT}-01`, tracestate: 'congo=t61rcWkgMzE' }, undefined], // an invalid one
    [{ traceparent: `00-${TRACE}-${PARENT}-01`, tracestate: 'congo=t61rcWkgMzE' }, 'congo=t61rcWkgMzE'] // continued
  ]
  for (let i = 0; i < cases.length; i++) {
    const [headers, expected] = cases[i] as [Record<string, string>, string | undefined]
    t.equal((await send(s.proxy, '/x', { headers })).status, 200)
    const received = upstream.received[i]?.headers
    t.equal(received?.tracestate, expected, `request ${i}: tracestate ${expected === undefined ? 'dropped with the new trace' : 'kept'}`)
    t.equal(forwarded(upstream, i)[1] === TRACE, expected !== undefined, `request ${i}: ${expected === undefined ? 'a new trace' : 'the caller\'s trace'}`)
  }
})

t.test('new ids for every request, across blocks of ready-made ids: valid, distinct, and each traceparent the request\'s own', async (t) => {
  const receiver = await startOtlpReceiver()
  t.teardown(receiver.close)
  const upstream = await startUpstream()
  t.teardown(upstream.close)
  const s = await startTestSidecar(t, { ...oneRoute(upstream.url, { name: 'all' }), ...tracing(receiver, { sampleRatio: 0.5 }) })
  const n = 300 // more than two blocks of ids
  for (let i = 0; i < n; i++) t.equal((await send(s.proxy, '/x')).status, 200)
  const traces = new Set<string>()
  const spanIds = new Set<string>()
  let sampled = 0
  for (let i = 0; i < n; i++) {
    const [version, traceId = '', spanId = '', flags, ...rest] = forwarded(upstream, i)
    if (version !== '00' || !HEX32.test(traceId) || !HEX16.test(spanId) || !(flags === '00' || flags === '01') || rest.length > 0) {
      t.fail(`request ${i}: traceparent ${String(upstream.received[i]?.headers.traceparent)}`)
    }
    if (flags === '01') sampled++
    traces.add(traceId)
    spanIds.add(spanId)
  }
  t.equal(traces.size, n, 'a new trace id for each request')
  t.equal(spanIds.size, n, 'a new span id for each request')
  t.ok(sampled > 0 && sampled < n, `ratio 0.5 samples some and not all (${sampled} of ${n})`)
  const spans = await spansArrive(receiver, sampled)
  for (const span of spans) {
    const i = upstream.received.findIndex((r) => r.headers.traceparent === `00-${span.traceId}-${span.spanId}-01`)
    t.ok(i >= 0, `span ${span.spanId}: its request's upstream got its trace id and span id`)
  }
  t.equal(spans.length, sampled, 'one span per sampled request')
})

t.test('sampling: ratio 0 exports no root, ratio 1 every one, and a caller\'s flag wins both ways', async (t) => {
  const receiver = await startOtlpReceiver()
  t.teardown(receiver.close)
  const upstream = await startUpstream()
  t.teardown(upstream.close)
  const none = await startTestSidecar(t, { ...oneRoute(upstream.url), ...tracing(receiver, { sampleRatio: 0 }) })
  for (let i = 0; i < 20; i++) await send(none.proxy, '/unsampled')
  t.ok(upstream.received.every((r) => String(r.headers.traceparent).endsWith('-00')), 'the upstream is told: not sampled')
  t.ok(upstream.received.every((r) => HEX16.test(String(r.headers.traceparent).split('-')[2])), 'still a span id of ours for the upstream to parent on')
  // A sampled caller's request, sent last: once its span is in, the unsampled ones would be too.
  await send(none.proxy, '/sampled-by-caller', { headers: { traceparent: `00-${TRACE}-${PARENT}-01` } })
  await spansArrive(receiver, 1)
  t.same(receiver.spans.map((x) => x.attributes['url.path']), ['/sampled-by-caller'], 'ratio 0: only the caller-sampled request')
  t.ok(none.logs.filter((l) => l.msg === 'request').every((l) => HEX32.test(String(l.trace_id)) && HEX16.test(String(l.span_id))), 'every line has trace_id and span_id, sampled or not')

  const all = await startTestSidecar(t, { ...oneRoute(upstream.url), ...tracing(receiver, { sampleRatio: 1 }) })
  receiver.spans.length = 0
  await send(all.proxy, '/unsampled-by-caller', { headers: { traceparent: `00-${TRACE}-${PARENT}-00` } })
  for (let i = 0; i < 20; i++) await send(all.proxy, `/all/${i}`)
  await spansArrive(receiver, 20)
  t.equal(receiver.spans.filter((x) => String(x.attributes['url.path']).startsWith('/all/')).length, 20, 'ratio 1: every root exported')
  t.notOk(receiver.spans.some((x) => x.attributes['url.path'] === '/unsampled-by-caller'), 'a caller\'s unsampled flag is honoured')
  t.equal(upstream.received.at(-21)?.headers.traceparent?.toString().split('-')[1], TRACE, 'its trace still continued')
})

t.test('failures: error status for 5xx with error.type and outcome; 5xx lines at warn', async (t) => {
  const receiver = await startOtlpReceiver()
  t.teardown(receiver.close)
  const failing = await startUpstream(status(503))
  t.teardown(failing.close)
  const s = await startTestSidecar(t, {
    upstreams: { app: { url: failing.url }, gone: { url: 'http://127.0.0.1:1' } },
    routes: [
      { name: 'busy', match: { path: '/busy' }, upstream: 'app' },
      { name: 'down', match: { pathPrefix: '/down' }, upstream: 'gone' }
    ],
    ...tracing(receiver)
  })
  t.equal((await send(s.proxy, '/busy')).status, 503)
  t.equal((await send(s.proxy, '/down')).status, 502)
  t.equal((await send(s.proxy, '/nowhere')).status, 404)
  const spans = await spansArrive(receiver, 3)
  const byPath = (p: string): OtlpSpan | undefined => spans.find((x) => x.attributes['url.path'] === p)
  const busy = byPath('/busy')
  t.equal(busy?.name, 'GET /busy')
  t.equal(busy?.status.code, 2, 'an upstream 503: ERROR')
  t.equal(busy?.attributes['error.type'], '503')
  t.equal(busy?.attributes['breakwater.outcome'], 'upstream')
  const down = byPath('/down')
  t.equal(down?.status.code, 2, 'a refused connection: ERROR')
  t.equal(down?.attributes['error.type'], 'upstream_unavailable')
  t.equal(down?.attributes['http.response.status_code'], 502)
  t.equal(down?.attributes['breakwater.upstream'], 'gone')
  const nowhere = byPath('/nowhere')
  t.equal(nowhere?.name, 'GET', 'no route: the method alone')
  t.notOk(nowhere?.status.code, 'a 404 is the client\'s: status unset')
  t.equal(nowhere?.attributes['error.type'], 'no_route')
  t.equal(nowhere?.attributes['breakwater.outcome'], 'breakwater')
  t.notOk('http.route' in (nowhere?.attributes ?? {}))

  t.ok(await eventually(() => s.logs.filter((l) => l.msg === 'request').length === 3))
  const lines = s.logs.filter((l) => l.msg === 'request')
  const line = (p: string): Record<string, unknown> | undefined => lines.find((l) => l['url.path'] === p)
  t.equal(line('/busy')?.level, 'warn')
  t.equal(line('/busy')?.['http.response.status_code'], 503)
  t.equal(line('/busy')?.['error.type'], '503')
  t.equal(line('/down')?.level, 'warn')
  t.equal(line('/nowhere')?.level, 'info', '4xx stays at info')
  t.equal(line('/busy')?.span_id, busy?.spanId)
})

t.test('a collector that holds its answers never delays a request; the full queue drops and counts', async (t) => {
  const receiver = await startOtlpReceiver()
  t.teardown(receiver.close)
  const upstream = await startUpstream()
  t.teardown(upstream.close)
  const s = await startTestSidecar(t, { ...oneRoute(upstream.url), ...tracing(receiver, { maxQueueSize: 4, batch: { maxSize: 2, delayMs: 10, timeoutMs: 60_000 } }) })
  receiver.hold()
  const first = once(receiver.arrived, 'request')
  await send(s.proxy, '/first')
  await first // an export is now in flight, its answer held
  for (let i = 0; i < 30; i++) t.equal((await send(s.proxy, `/while-held/${i}`)).status, 200)
  t.pass('30 requests completed while the collector held its answer')
  t.equal(receiver.requests.length, 1, 'one export at a time')
  t.equal(await metricValue(s.ops, 'breakwater_trace_spans_dropped_total', { reason: 'queue_full' }), 26, '30 spans, 4 queued, 26 dropped')
  receiver.release()
  t.ok(await eventually(() => receiver.spans.length === 5, 30_000), 'the first span and the 4 queued ones reach it once it answers')
  t.ok(await eventually(async () => await metricValue(s.ops, 'breakwater_trace_spans_exported_total') === 5), 'exported counted')
})

t.test('a collector that is down: requests unaffected, failed batches counted, one warning', async (t) => {
  const receiver = await startOtlpReceiver()
  const url = receiver.url
  await receiver.close() // nothing listens there now
  const upstream = await startUpstream()
  t.teardown(upstream.close)
  const s = await startTestSidecar(t, { ...oneRoute(upstream.url), tracing: { otlpEndpoint: url, sampleRatio: 1, batch: { delayMs: 10, timeoutMs: 2000 } } })
  for (let i = 0; i < 10; i++) t.equal((await send(s.proxy, `/r/${i}`)).status, 200)
  t.ok(await eventually(async () => await metricValue(s.ops, 'breakwater_trace_spans_dropped_total', { reason: 'export_failed' }) === 10, 30_000), 'every span counted as dropped')
  const warnings = s.logs.filter((l) => l.event === 'tracing_export')
  t.equal(warnings.length, 1, 'one warning for the failing streak')
  t.equal(warnings[0]?.level, 'warn')
})

/** The problems (one a line) of a config with `tracing`, or '' when it loads. */
function tracingProblems (tracing: Record<string, unknown>): string {
  try {
    resolveConfig({ service: 'svc', upstreams: { app: { url: 'http://127.0.0.1:1' } }, routes: [{ match: { pathPrefix: '/' }, upstream: 'app' }], tracing }, { env: {} })
    return ''
  } catch (err) {
    return err instanceof ConfigError ? err.problems.join('\n') : String(err)
  }
}

t.test('tracing config: defaults, endpoint path, and problems that name the key', async (t) => {
  const base = { service: 'svc', upstreams: { app: { url: 'http://127.0.0.1:1' } }, routes: [{ match: { pathPrefix: '/' }, upstream: 'app' }] }
  const { config } = resolveConfig({ ...base, tracing: { otlpEndpoint: 'http://collector:4318', sampleRatio: 0.01 } })
  t.same(config.tracing, { otlpEndpoint: 'http://collector:4318/v1/traces', sampleRatio: 0.01, serviceName: 'svc', protocol: 'http/protobuf', headers: {}, tls: { ca: null, caPem: null }, maxQueueSize: 2048, batch: { maxSize: 512, delayMs: 1000, timeoutMs: 10_000 } })
  t.equal(resolveConfig({ ...base, tracing: { otlpEndpoint: 'https://otlp.example/api/v1/traces', sampleRatio: 1 } }).config.tracing?.otlpEndpoint, 'https://otlp.example/api/v1/traces', 'a full URL is kept')
  t.equal(resolveConfig(base).config.tracing, null)
  t.match(tracingProblems({ otlpEndpoint: 'collector:4318', sampleRatio: 1 }), /tracing\.otlpEndpoint/)
  t.match(tracingProblems({ otlpEndpoint: 'http://c:4318', sampleRatio: 2 }), /tracing\.sampleRatio/)
  t.match(tracingProblems({ otlpEndpoint: 'http://c:4318', sampleRatio: 1, protocol: 'grpc' }), /tracing\.protocol/, 'OTLP over gRPC is not offered')
  t.match(tracingProblems({ otlpEndpoint: 'http://c:4318' }), /tracing\.sampleRatio/)
  t.match(tracingProblems({ otlpEndpoint: 'http://c:4318', sampleRatio: 1, maxQueueSize: 10, batch: { maxSize: 20 } }), /tracing\.batch\.maxSize/)
  t.match(tracingProblems({ otlpEndpoint: 'http://c:4318', sampleRatio: 1, batch: { size: 20 } }), /tracing\.batch/)
  const secret = tracingProblems({ otlpEndpoint: 'http://c:4318', sampleRatio: 1, headers: { 'x-api-key': 42 } })
  t.match(secret, /tracing\.headers/)
  t.notMatch(secret, /42/, 'a header value is never echoed')
})

/** An https:// OTLP collector signed by a private CA (its `pki`), and an upstream to trace requests to. */
async function privateCollector (t: Test): Promise<{ pki: Pki, receiver: OtlpReceiver, upstream: TestUpstream }> {
  const pki = createPki(t, 'Collector CA')
  const receiver = await startOtlpReceiver(pki.issue('collector', 1))
  t.teardown(receiver.close)
  const upstream = await startUpstream()
  t.teardown(upstream.close)
  return { pki, receiver, upstream }
}

t.test('tracing.tls.ca: spans reach an https:// collector signed by a private CA; problems name the key', async (t) => {
  const { pki, receiver, upstream } = await privateCollector(t)
  const s = await startTestSidecar(t, { ...oneRoute(upstream.url), ...tracing(receiver, { tls: { ca: pki.ca } }) })
  t.equal((await send(s.proxy, '/over-tls')).status, 200)
  const [span] = await spansArrive(receiver, 1)
  t.equal(span?.attributes['url.path'], '/over-tls', 'the span arrived over TLS, verified against the private CA')
  t.equal(await metricValue(s.ops, 'breakwater_trace_spans_exported_total'), 1, 'counted as exported')

  const problems = (tracing: Record<string, unknown>): string => tracingProblems({ sampleRatio: 1, ...tracing })
  const notPem = join(pki.dir, 'not-pem.crt')
  writeFileSync(notPem, 'not a certificate')
  t.match(problems({ otlpEndpoint: receiver.url, tls: { ca: join(pki.dir, 'missing.crt') } }), /tracing\.tls\.ca: .*missing\.crt does not exist/, 'a missing file names the key')
  t.match(problems({ otlpEndpoint: receiver.url, tls: { ca: notPem } }), /tracing\.tls\.ca: .*not-pem\.crt is not a PEM certificate/, 'so does one that is not PEM')
  t.match(problems({ otlpEndpoint: 'http://127.0.0.1:4318', tls: { ca: pki.ca } }), /tracing\.tls: set for a plain http:\/\/ otlpEndpoint/, 'and a CA for a plain http:// collector')
  t.equal(problems({ otlpEndpoint: receiver.url, tls: { ca: pki.ca } }), '', 'a readable CA for an https:// collector is fine')
})

t.test('tracing.tls.ca is read once, by the config check: a CA file moved away before the exporter starts does not matter', async (t) => {
  const { pki, receiver, upstream } = await privateCollector(t)
  const stateDir = mkdtempSync(join(tmpdir(), 'breakwater-test-'))
  const { config } = resolveConfig(testSidecarInput({ ...oneRoute(upstream.url), ...tracing(receiver, { tls: { ca: pki.ca } }) }, stateDir))
  // A rotation moves the bundle away between the check and the start.
  renameSync(pki.ca, `${pki.ca}.old`)
  const s = await startCaptured(t, config, stateDir)
  t.equal((await send(s.proxy, '/checked-ca')).status, 200)
  const [span] = await spansArrive(receiver, 1)
  t.equal(span?.attributes['url.path'], '/checked-ca', 'verified against the CA as the config check read it')
})

t.test('a request refused at admission and one with two traceparents still take their place in a trace', async (t) => {
  const receiver = await startOtlpReceiver()
  t.teardown(receiver.close)
  const held: Array<() => void> = []
  const upstream = await startUpstream((req, res) => {
    if (req.url === '/held') held.push(() => res.end('late'))
    else res.end('now')
  })
  t.teardown(async () => { for (const answer of held) answer(); await upstream.close() })
  const s = await startTestSidecar(t, { ...oneRoute(upstream.url), ...tracing(receiver), limits: { maxInFlight: 1 } })
  const first = send(s.proxy, '/held')
  t.ok(await eventually(() => held.length === 1), 'the first request is in flight')
  const refused = await send(s.proxy, '/refused', { headers: { traceparent: `00-${TRACE}-${PARENT}-01` } })
  t.equal(refused.status, 503)
  for (const answer of held.splice(0)) answer()
  t.equal((await first).status, 200)
  // W3C Trace Context §3.2: two traceparent headers make it invalid; a new trace, one header forwarded.
  t.equal((await send(s.proxy, '/twice', { headers: ['traceparent', `00-${TRACE}-${PARENT}-01`, 'traceparent', `00-${TRACE}-${PARENT}-00`] })).status, 200)
  const spans = await spansArrive(receiver, 3)
  const overloaded = spans.find((x) => x.attributes['url.path'] === '/refused')
  t.equal(overloaded?.traceId, TRACE, 'an overloaded refusal continues the caller\'s trace')
  t.equal(overloaded?.parentSpanId, PARENT)
  t.equal(overloaded?.attributes['error.type'], 'overloaded')
  t.equal(overloaded?.status.code, 2)
  const twice = spans.find((x) => x.attributes['url.path'] === '/twice')
  t.not(twice?.traceId, TRACE, 'two traceparents: a new trace')
  t.equal(twice?.parentSpanId, '')
  const last = upstream.received.at(-1)
  t.equal(last?.rawHeaders.filter((h) => h.toLowerCase() === 'traceparent').length, 1, 'one traceparent forwarded')
  t.equal(forwarded(upstream, upstream.received.length - 1)[2], twice?.spanId)
  t.ok(await eventually(() => s.logs.some((l) => l.msg === 'request' && l['url.path'] === '/refused')))
  t.equal(s.logs.find((l) => l.msg === 'request' && l['url.path'] === '/refused')?.trace_id, TRACE)
})

t.test('at shutdown the queued spans are sent before the exit', async (t) => {
  const receiver = await startOtlpReceiver()
  t.teardown(receiver.close)
  const upstream = await startUpstream()
  t.teardown(upstream.close)
  // A batch delay no test waits for: only the shutdown flush can send these.
  const s = await startTestSidecar(t, { ...oneRoute(upstream.url), ...tracing(receiver, { batch: { delayMs: 600_000 } }) })
  for (let i = 0; i < 3; i++) await send(s.proxy, `/q/${i}`)
  t.equal(receiver.spans.length, 0, 'nothing sent yet')
  await s.sidecar.shutdown()
  t.equal(receiver.spans.length, 3, 'the three queued spans reached the collector during shutdown')
})

t.test('a reload that changes tracing keeps the running tracing and says it applies at restart', async (t) => {
  const receiver = await startOtlpReceiver()
  t.teardown(receiver.close)
  const upstream = await startUpstream()
  t.teardown(upstream.close)
  const s = await startTestSidecar(t, { ...oneRoute(upstream.url), ...tracing(receiver) })
  const running = s.sidecar.config.tracing
  await s.sidecar.apply({ ...s.sidecar.config, tracing: { ...running as NonNullable<typeof running>, sampleRatio: 0 } })
  t.same(s.sidecar.config.tracing, running, 'the running tracing config is kept')
  t.ok(s.logs.some((l) => l.level === 'warn' && l.msg === 'tracing changes take effect at the next restart'), 'a warning says so')
  await send(s.proxy, '/after-reload')
  await spansArrive(receiver, 1)
  t.equal(receiver.spans[0]?.attributes['url.path'], '/after-reload', 'still sampled at the running ratio (1)')
})

t.test('a reload that changes the version: spans of requests after it carry the new service.version, those before the old', async (t) => {
  for (const protocol of ['http/protobuf', 'http/json']) {
    const receiver = await startOtlpReceiver()
    t.teardown(receiver.close)
    const upstream = await startUpstream()
    t.teardown(upstream.close)
    const s = await startTestSidecar(t, { ...oneRoute(upstream.url), ...tracing(receiver, { protocol }) })
    const before = s.sidecar.config.version
    await send(s.proxy, '/before')
    await s.sidecar.apply({ ...s.sidecar.config, version: '2.0.0-rc.1+build.7' })
    await send(s.proxy, '/after')
    const spans = await spansArrive(receiver, 2)
    const versionOf = (path: string): unknown => spans.find((x) => x.attributes['url.path'] === path)?.resource['service.version']
    t.equal(versionOf('/before'), before, `${protocol}: a request before the reload, the version it ran under`)
    t.equal(versionOf('/after'), '2.0.0-rc.1+build.7', `${protocol}: a request after it, the version now running`)
  }
})
