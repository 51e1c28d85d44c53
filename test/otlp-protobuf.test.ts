/**
 * The sidecar's own OTLP protobuf encoding of server spans (ops/otlp-protobuf.ts) against
 * OpenTelemetry's `ProtobufTraceSerializer`: for the same requests, the export request must be
 * the same bytes. Covers the attributes each kind of request carries, hostile and non-ASCII
 * strings, a span longer than the room kept for its length, batch growth and repeated values.
 */
import t from 'tap'
import { ProtobufTraceSerializer } from '@opentelemetry/otlp-transformer'
import { resourceFromAttributes } from '@opentelemetry/resources'
import { ProtobufEncoding, JsonEncoding } from '../src/ops/tracing.js'
import { SpanEncoder, decodeExportTraceServiceResponse } from '../src/ops/otlp-protobuf.js'
import type { RequestContext } from '../src/proxy/context.js'

const unused = { export: () => { throw new Error('not sent in this test') }, shutdown: async () => {} }
const scope = { name: 'breakwater', version: '0.1.0' }
const resourceAttributes = { 'service.name': 'checkout', 'service.version': '1.4.2' }

interface Request {
  method?: string
  path?: string
  host?: string
  status?: number
  parent?: string
  agent?: string
  route?: boolean
  cause?: string | null
  errorCode?: string | null
  encrypted?: boolean
  peer?: string
}

let n = 0
/** A finished request as the data plane leaves it (the fields spans read). */
function request (r: Request = {}): RequestContext {
  n++
  const raw = ['host', r.host ?? 'shop.example:8080', 'accept', '*/*']
  if (r.agent !== undefined) raw.push('User-Agent', r.agent)
  const route = r.route === false ? null : { name: 'api', upstream: { name: 'app' }, config: { match: { path: null, pathPrefix: '/api/' } } }
  return {
    traceId: (0x4bf92f35 + n).toString(16).padStart(32, '0'),
    spanId: (0xf067aa0b + n).toString(16).padStart(16, '0'),
    parentSpanId: r.parent ?? '',
    startedAt: performance.now() - 1.2345678,
    status: r.status ?? 200,
    route,
    req: { method: r.method ?? 'GET', httpVersion: '1.1', rawHeaders: raw, headers: {} },
    head: { host: r.host ?? 'shop.example:8080' },
    clientSocket: { remoteAddress: r.peer ?? '::ffff:10.0.3.17', encrypted: r.encrypted === true },
    path: r.path ?? `/api/orders/${n}?page=2`,
    cause: r.cause === undefined ? 'ok' : r.cause,
    errorCode: r.errorCode ?? null
  } as unknown as RequestContext
}

/** Both encodings of the same requests, ended at the same instants. */
function encodeBoth (ctxs: RequestContext[], initialSpans = 512): { ours: Buffer, theirs: Buffer } {
  const encoder = new SpanEncoder(resourceAttributes, scope)
  const protobuf = new ProtobufEncoding(encoder, unused, initialSpans)
  const json = new JsonEncoding(unused, resourceFromAttributes(resourceAttributes), scope)
  const batch = protobuf.open()
  const spans = json.open()
  for (const ctx of ctxs) {
    const endMs = performance.now()
    protobuf.append(batch, ctx, endMs)
    json.append(spans, ctx, endMs)
  }
  t.equal(protobuf.count(batch), ctxs.length, 'every span counted')
  return { ours: Buffer.from(encoder.request(batch)), theirs: Buffer.from(ProtobufTraceSerializer.serializeRequest(spans) as Uint8Array) }
}

function same (name: string, ctxs: RequestContext[], initialSpans?: number): void {
  t.test(name, async (t) => {
    const { ours, theirs } = encodeBoth(ctxs, initialSpans)
    t.ok(theirs.length > 0, 'OpenTelemetry wrote a request')
    t.equal(ours.length, theirs.length, 'same length')
    t.ok(ours.equals(theirs), 'same bytes')
  })
}

same('a proxied GET, a continued trace', [request({ parent: '00f067aa0ba902b7', agent: 'curl/8.5.0' })])
same('one of each kind of request in one batch', [
  request(),
  request({ status: 502, cause: 'upstream', errorCode: 'upstream_unavailable' }),
  request({ status: 503, cause: 'breakwater', errorCode: 'circuit_open' }),
  request({ status: 499, cause: null, errorCode: null }),
  request({ method: 'PURGE' }),
  request({ method: 'DELETE', status: 204, route: false }),
  request({ host: '[::1]:9443', encrypted: true, peer: '::1' }),
  request({ host: '' }),
  request({ status: 500, cause: 'upstream' }),
  request({ errorCode: 'upstream_reset', status: 200, cause: 'upstream' })
])
same('non-ASCII and hostile strings', [
  request({ path: '/api/café/ü?q=ä', agent: 'Mozilla/5.0 (日本語) \u0000\u001f"\\' }),
  request({ path: '/api/\ud800lone', agent: 'x\udfffy' }),
  request({ path: '/api/emoji/😀', host: 'bücher.example' })
])
same('a span longer than 16 KiB (a very long URL and user agent)', [
  request({ path: '/api/' + 'a'.repeat(20000), agent: 'b'.repeat(9000) }),
  request({ path: '/api/' + 'é'.repeat(7000) }),
  request()
])
same('a batch that outgrows its first buffer', Array.from({ length: 300 }, (_, i) => request({ status: i % 7 === 0 ? 503 : 200, path: `/api/items/${i}`, agent: `agent-${i % 90}` })), 1)
same('values seen before (kept encodings) and past what a key keeps', Array.from({ length: 200 }, (_, i) => request({ agent: `agent-${i}`, host: `h${i % 70}.example:${8000 + i}` })))

t.test('the request holds the spans and nothing else: a reused batch starts empty', async (t) => {
  const encoder = new SpanEncoder(resourceAttributes, scope)
  const protobuf = new ProtobufEncoding(encoder, unused, 4)
  const first = protobuf.open()
  protobuf.append(first, request(), performance.now())
  protobuf.release(first)
  const again = protobuf.open()
  t.equal(again, first, 'the buffer is reused')
  t.equal(protobuf.count(again), 0, 'with no spans')
  const ctx = request()
  const endMs = performance.now()
  protobuf.append(again, ctx, endMs)
  const json = new JsonEncoding(unused, resourceFromAttributes(resourceAttributes), scope)
  const spans = json.open()
  json.append(spans, ctx, endMs)
  t.ok(Buffer.from(encoder.request(again)).equals(Buffer.from(ProtobufTraceSerializer.serializeRequest(spans) as Uint8Array)), 'same bytes as one fresh span')
})

t.test('the collector\'s answer decodes as OpenTelemetry\'s serializer decodes it', async (t) => {
  const varint = (n: number): number[] => {
    const out: number[] = []
    for (;;) {
      const low = n % 128
      n = Math.floor(n / 128)
      if (n === 0) { out.push(low); return out }
      out.push(low | 0x80)
    }
  }
  const field = (tag: number, bytes: number[]): number[] => [tag, ...varint(bytes.length), ...bytes]
  const text = (s: string): number[] => [...Buffer.from(s, 'utf8')]
  const partial = (...inner: number[][]): number[] => field(0x0a, inner.flat())
  const cases: Array<[string, number[]]> = [
    ['empty (full success)', []],
    ['an empty partial_success', partial()],
    ['rejected spans and a message', partial([0x08, ...varint(3)], field(0x12, text('3 spans dropped: quota')))],
    ['a large int64 count', partial([0x08, ...varint(2 ** 40 + 7)])],
    ['a non-ASCII message', partial(field(0x12, text('überschritten — 配额')))],
    ['unknown fields of every wire type, both levels', [
      ...[0x10, ...varint(99)], 0x19, 1, 2, 3, 4, 5, 6, 7, 8, 0x25, 1, 2, 3, 4, ...field(0x2a, [1, 2, 3]),
      ...partial([0x18, ...varint(5)], field(0x22, [9, 9]), [0x2d, 1, 2, 3, 4], [0x08, ...varint(1)], [0x31, 0, 0, 0, 0, 0, 0, 0, 0])
    ]],
    ['the last of a repeated field wins', [...partial([0x08, 1]), ...partial([0x08, 2], field(0x12, text('second')))]]
  ]
  for (const [name, bytes] of cases) {
    const data = Uint8Array.from(bytes)
    t.same(decodeExportTraceServiceResponse(data), ProtobufTraceSerializer.deserializeResponse(data), name)
  }
  // Inside a larger buffer, as a response body may be.
  const inner = Uint8Array.from(partial([0x08, 4], field(0x12, text('four'))))
  const framed = new Uint8Array(inner.length + 20)
  framed.set(inner, 10)
  const view = framed.subarray(10, 10 + inner.length)
  t.same(decodeExportTraceServiceResponse(view), { partialSuccess: { rejectedSpans: 4, errorMessage: 'four' } })

  for (const [name, bytes] of [['a truncated varint', [0x0a, 0x02, 0x08, 0x80]], ['a length past the end', [0x0a, 0x05, 0x08]], ['a group wire type', [0x0b]]] as Array<[string, number[]]>) {
    const data = Uint8Array.from(bytes)
    t.throws(() => ProtobufTraceSerializer.deserializeResponse(data), `${name}: OpenTelemetry's throws`)
    t.throws(() => decodeExportTraceServiceResponse(data), `${name}: so does ours`)
  }
})
