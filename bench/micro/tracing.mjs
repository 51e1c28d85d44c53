// Micro benchmark of what tracing adds for a sampled request once it has ended: serialising its
// server span for OTLP/HTTP, in binary protobuf (tracing.protocol's default) and in JSON, with
// OpenTelemetry's own serialisers, on spans shaped as the sidecar builds them (ops/tracing.ts).
// The report is the median CPU µs per span over batches of 512, and the bytes per batch.
//
//   node bench/micro/tracing.mjs [--rounds 7] [--batches 100]
import { parseArgs } from 'node:util'
import { JsonTraceSerializer, ProtobufTraceSerializer } from '@opentelemetry/otlp-transformer'
import { resourceFromAttributes } from '@opentelemetry/resources'

const { values } = parseArgs({ options: { rounds: { type: 'string', default: '7' }, batches: { type: 'string', default: '100' } } })
const rounds = Number(values.rounds)
const batches = Number(values.batches)
const BATCH = 512

const resource = resourceFromAttributes({ 'service.name': 'checkout', 'service.version': '1.4.2' })
const scope = { name: 'breakwater', version: '0.1.0' }
const hex = (n, width) => n.toString(16).padStart(width, '0')

/** A finished server span of request `i`, with the attributes a proxied GET gets. */
function span (i) {
  const context = { traceId: hex(0x4bf92f35 + i, 32), spanId: hex(0xf067aa0b + i, 16), traceFlags: 1 }
  return {
    name: 'GET /api/*',
    kind: 1,
    parentSpanContext: { traceId: context.traceId, spanId: hex(0xa902b7 + i, 16), traceFlags: 1, isRemote: true },
    startTime: [1764700000, 1234567],
    endTime: [1764700000, 2234567],
    duration: [0, 1000000],
    status: { code: 0 },
    attributes: {
      'http.request.method': 'GET',
      'url.path': `/api/orders/${i}`,
      'url.scheme': 'http',
      'network.protocol.version': '1.1',
      'breakwater.outcome': 'ok',
      'server.address': 'shop.example',
      'server.port': 8080,
      'http.response.status_code': 200,
      'http.route': '/api/*',
      'client.address': '10.0.3.17',
      'user_agent.original': 'Mozilla/5.0 (X11; Linux x86_64)',
      'breakwater.route': 'api',
      'breakwater.upstream': 'app'
    },
    links: [],
    events: [],
    ended: true,
    resource,
    instrumentationScope: scope,
    droppedAttributesCount: 0,
    droppedEventsCount: 0,
    droppedLinksCount: 0,
    spanContext: () => context
  }
}

const batch = Array.from({ length: BATCH }, (_, i) => span(i))

function median (xs) {
  const s = [...xs].sort((a, b) => a - b)
  return s[Math.floor(s.length / 2)]
}

function measure (name, serializer) {
  let bytes = 0
  for (let i = 0; i < 20; i++) bytes = serializer.serializeRequest(batch).length // warm up
  const samples = []
  for (let r = 0; r < rounds; r++) {
    const before = process.cpuUsage()
    for (let b = 0; b < batches; b++) serializer.serializeRequest(batch)
    const used = process.cpuUsage(before)
    samples.push((used.user + used.system) / (batches * BATCH))
  }
  return { name, usPerSpan: median(samples), min: Math.min(...samples), max: Math.max(...samples), bytes }
}

const results = [
  measure('http/protobuf', ProtobufTraceSerializer),
  measure('http/json', JsonTraceSerializer)
]
console.log(`| encoding | CPU µs per span (median) | min–max | bytes per batch of ${BATCH} |`)
console.log('|---|---:|---:|---:|')
for (const r of results) console.log(`| ${r.name} | ${r.usPerSpan.toFixed(2)} | ${r.min.toFixed(2)}–${r.max.toFixed(2)} | ${r.bytes.toLocaleString('en-US')} |`)
