// Micro benchmark of what tracing adds for a sampled request once it has ended: from the
// finished request to the bytes of its OTLP/HTTP export request, per span, over batches of 512.
//
//   - `http/protobuf` (the default): the sidecar's own encoder (ops/otlp-protobuf.ts) appends
//     each span's bytes to its batch when the request ends;
//   - `OpenTelemetry protobuf`: a span object per request (what the encoding before 2026-12-03
//     built), serialised by OpenTelemetry's ProtobufTraceSerializer when the batch is sent;
//   - `http/json`: the same span objects through OpenTelemetry's JsonTraceSerializer.
//
// All three write the same spans (test/otlp-protobuf.test.ts checks the two protobuf ones are
// the same bytes). Needs a built dist/ (npm run build).
//
//   node bench/micro/tracing.mjs [--rounds 7] [--batches 100]
import { parseArgs } from 'node:util'
import { JsonTraceSerializer, ProtobufTraceSerializer } from '@opentelemetry/otlp-transformer'
import { resourceFromAttributes } from '@opentelemetry/resources'
import { ProtobufEncoding, JsonEncoding } from '../../dist/ops/tracing.js'
import { SpanEncoder } from '../../dist/ops/otlp-protobuf.js'

const { values } = parseArgs({ options: { rounds: { type: 'string', default: '7' }, batches: { type: 'string', default: '100' } } })
const rounds = Number(values.rounds)
const batches = Number(values.batches)
const BATCH = 512

const attributes = { 'service.name': 'checkout', 'service.version': '1.4.2' }
const scope = { name: 'breakwater', version: '0.1.0' }
const unused = { export: () => {}, shutdown: async () => {} }
const hex = (n, width) => n.toString(16).padStart(width, '0')
const route = { name: 'api', upstream: { name: 'app' }, config: { match: { path: null, pathPrefix: '/api/' } } }

/** Request `i` as the data plane leaves it: a proxied GET from one of a few callers. */
function request (i) {
  return {
    traceId: hex(0x4bf92f35 + i, 32),
    spanId: hex(0xf067aa0b + i, 16),
    parentSpanId: i % 2 === 0 ? hex(0xa902b7 + i, 16) : '',
    startedAt: performance.now() - 1,
    status: i % 50 === 0 ? 503 : 200,
    route,
    req: { method: 'GET', httpVersion: '1.1', rawHeaders: ['host', 'shop.example:8080', 'user-agent', `Mozilla/5.0 (X11; Linux x86_64) caller-${i % 4}`, 'accept', '*/*'], headers: {} },
    head: { host: 'shop.example:8080' },
    clientSocket: { remoteAddress: `::ffff:10.0.3.${i % 4}`, encrypted: false },
    path: `/api/orders/${i}?page=2`,
    cause: i % 50 === 0 ? 'upstream' : 'ok',
    errorCode: null
  }
}

const requests = Array.from({ length: BATCH }, (_, i) => request(i))
const endMs = performance.now()

const encoder = new SpanEncoder(attributes, scope)
const protobuf = new ProtobufEncoding(encoder, unused, BATCH)
const json = new JsonEncoding(unused, resourceFromAttributes(attributes), scope)

/** One batch, from the requests to the bytes sent. */
const ways = {
  'http/protobuf': () => {
    const batch = protobuf.open()
    for (const ctx of requests) protobuf.append(batch, ctx, endMs)
    const bytes = encoder.request(batch).length
    protobuf.release(batch)
    return bytes
  },
  'OpenTelemetry protobuf': () => {
    const spans = json.open()
    for (const ctx of requests) json.append(spans, ctx, endMs)
    return ProtobufTraceSerializer.serializeRequest(spans).length
  },
  'http/json': () => {
    const spans = json.open()
    for (const ctx of requests) json.append(spans, ctx, endMs)
    return JsonTraceSerializer.serializeRequest(spans).length
  }
}

function median (xs) {
  const s = [...xs].sort((a, b) => a - b)
  return s[Math.floor(s.length / 2)]
}

const samples = Object.fromEntries(Object.keys(ways).map((k) => [k, []]))
const bytes = {}
for (const [name, way] of Object.entries(ways)) for (let i = 0; i < 20; i++) bytes[name] = way() // warm up
// Rounds interleave the three, so a noisy moment touches each alike.
for (let r = 0; r < rounds; r++) {
  for (const [name, way] of Object.entries(ways)) {
    const before = process.cpuUsage()
    for (let b = 0; b < batches; b++) way()
    const used = process.cpuUsage(before)
    samples[name].push((used.user + used.system) / (batches * BATCH))
  }
}
console.log(`| encoding | CPU µs per span (median) | min–max | bytes per batch of ${BATCH} |`)
console.log('|---|---:|---:|---:|')
for (const [name, s] of Object.entries(samples)) console.log(`| ${name} | ${median(s).toFixed(2)} | ${Math.min(...s).toFixed(2)}–${Math.max(...s).toFixed(2)} | ${bytes[name].toLocaleString('en-US')} |`)
