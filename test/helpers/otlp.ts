/**
 * A real local OTLP/HTTP receiver (the collector's `/v1/traces` endpoint, binary protobuf or
 * JSON, by content type, as a collector accepts both): it decodes every export request into flat spans. `hold()` keeps every answer back until
 * `release()` (a collector that is slow), and `arrived` fires once per export request.
 */
import http from 'node:http'
import https from 'node:https'
import { readFileSync } from 'node:fs'
import { EventEmitter } from 'node:events'
import type { AddressInfo } from 'node:net'

export interface OtlpSpan {
  traceId: string
  spanId: string
  parentSpanId: string
  name: string
  kind: number
  status: { code?: number }
  attributes: Record<string, string | number | boolean>
  resource: Record<string, string | number | boolean>
  startTimeUnixNano: string
  endTimeUnixNano: string
}

export interface OtlpReceiver {
  url: string
  spans: OtlpSpan[]
  /** Every export request: path and content type. */
  requests: Array<{ path: string, contentType: string }>
  arrived: EventEmitter
  hold: () => void
  release: () => void
  close: () => Promise<void>
}

interface KeyValue { key: string, value: { stringValue?: string, intValue?: string | number, boolValue?: boolean, doubleValue?: number } }

function flat (list: KeyValue[] | undefined): Record<string, string | number | boolean> {
  const out: Record<string, string | number | boolean> = {}
  for (const { key, value } of list ?? []) {
    out[key] = value.stringValue ?? (value.intValue !== undefined ? Number(value.intValue) : value.boolValue ?? value.doubleValue ?? '')
  }
  return out
}

type Value = string | number | boolean

/** The protobuf wire format's fields of one message: number → raw values (varint as bigint, fixed64 as bigint, bytes as Buffer). */
function fields (buf: Buffer): Map<number, Array<bigint | Buffer>> {
  const out = new Map<number, Array<bigint | Buffer>>()
  let at = 0
  const varint = (): bigint => {
    let v = 0n
    let shift = 0n
    for (;;) {
      const b = buf[at++]
      if (b === undefined) throw new Error('protobuf: truncated varint')
      v |= BigInt(b & 0x7f) << shift
      if ((b & 0x80) === 0) return v
      shift += 7n
    }
  }
  while (at < buf.length) {
    const key = Number(varint())
    const field = key >>> 3
    let value: bigint | Buffer
    switch (key & 7) {
      case 0: value = varint(); break
      case 1: value = buf.readBigUInt64LE(at); at += 8; break
      case 2: { const n = Number(varint()); value = buf.subarray(at, at + n); at += n; break }
      case 5: value = BigInt(buf.readUInt32LE(at)); at += 4; break
      default: throw new Error(`protobuf: wire type ${key & 7} of field ${field}`)
    }
    const list = out.get(field)
    if (list === undefined) out.set(field, [value])
    else list.push(value)
  }
  return out
}

const one = (m: Map<number, Array<bigint | Buffer>>, n: number): bigint | Buffer | undefined => m.get(n)?.[0]
const bytes = (m: Map<number, Array<bigint | Buffer>>, n: number): Buffer => (one(m, n) as Buffer | undefined) ?? Buffer.alloc(0)

/** `KeyValue` messages (key 1, AnyValue 2: string 1, bool 2, int 3, double 4) as a flat record. */
function flatProto (list: Array<bigint | Buffer> | undefined): Record<string, Value> {
  const out: Record<string, Value> = {}
  for (const kv of list ?? []) {
    const m = fields(kv as Buffer)
    const value = fields(bytes(m, 2))
    const s = one(value, 1)
    const b = one(value, 2)
    const i = one(value, 3)
    const d = one(value, 4)
    out[bytes(m, 1).toString('utf8')] = s !== undefined
      ? (s as Buffer).toString('utf8')
      : b !== undefined ? b === 1n : i !== undefined ? Number(BigInt.asIntN(64, i as bigint)) : d !== undefined ? (() => { const x = Buffer.alloc(8); x.writeBigUInt64LE(d as bigint); return x.readDoubleLE() })() : ''
  }
  return out
}

/** An `ExportTraceServiceRequest` in protobuf (opentelemetry-proto trace.proto's field numbers). */
function decodeProtobuf (body: Buffer): OtlpSpan[] {
  const spans: OtlpSpan[] = []
  for (const rsBytes of fields(body).get(1) ?? []) {
    const rs = fields(rsBytes as Buffer)
    const resource = flatProto(fields(bytes(rs, 1)).get(1))
    for (const ssBytes of rs.get(2) ?? []) {
      for (const spanBytes of fields(ssBytes as Buffer).get(2) ?? []) {
        const sp = fields(spanBytes as Buffer)
        const status = fields(bytes(sp, 15))
        const code = one(status, 3)
        spans.push({
          traceId: bytes(sp, 1).toString('hex'),
          spanId: bytes(sp, 2).toString('hex'),
          parentSpanId: bytes(sp, 4).toString('hex'),
          name: bytes(sp, 5).toString('utf8'),
          kind: Number(one(sp, 6) ?? 0n),
          status: code === undefined ? {} : { code: Number(code) },
          attributes: flatProto(sp.get(9)),
          resource,
          startTimeUnixNano: String(one(sp, 7) ?? 0n),
          endTimeUnixNano: String(one(sp, 8) ?? 0n)
        })
      }
    }
  }
  return spans
}

/** An `ExportTraceServiceRequest` in OTLP's JSON encoding. */
function decodeJson (body: Buffer): OtlpSpan[] {
  const spans: OtlpSpan[] = []
  const request = JSON.parse(body.toString('utf8')) as { resourceSpans: Array<{ resource: { attributes: KeyValue[] }, scopeSpans: Array<{ spans: Array<OtlpSpan & { attributes: KeyValue[] }> }> }> }
  for (const rs of request.resourceSpans) {
    const resource = flat(rs.resource.attributes)
    for (const ss of rs.scopeSpans) {
      for (const span of ss.spans) spans.push({ ...span, parentSpanId: span.parentSpanId ?? '', status: span.status ?? {}, attributes: flat(span.attributes), resource })
    }
  }
  return spans
}

/** With `tls` (certificate and key files), the receiver is an `https://` collector. */
export async function startOtlpReceiver (tls?: { cert: string, key: string }): Promise<OtlpReceiver> {
  let held: Array<() => void> | null = null
  const state: OtlpReceiver = {
    url: '',
    spans: [],
    requests: [],
    arrived: new EventEmitter(),
    hold: () => { held ??= [] },
    release: () => {
      const answers = held ?? []
      held = null
      for (const answer of answers) answer()
    },
    close: async () => {}
  }
  const handle: http.RequestListener = (req, res) => {
    const chunks: Buffer[] = []
    req.on('data', (c: Buffer) => chunks.push(c))
    req.on('end', () => {
      state.requests.push({ path: req.url ?? '', contentType: req.headers['content-type'] ?? '' })
      const body = Buffer.concat(chunks)
      const protobuf = (req.headers['content-type'] ?? '').startsWith('application/x-protobuf')
      state.spans.push(...(protobuf ? decodeProtobuf(body) : decodeJson(body)))
      // An empty ExportTraceServiceResponse: full success.
      const answer = (): void => {
        if (protobuf) { res.writeHead(200, { 'content-type': 'application/x-protobuf' }); res.end() } else { res.writeHead(200, { 'content-type': 'application/json' }); res.end('{}') }
      }
      if (held !== null) held.push(answer)
      else answer()
      state.arrived.emit('request')
    })
  }
  const server = tls === undefined ? http.createServer(handle) : https.createServer({ cert: readFileSync(tls.cert), key: readFileSync(tls.key) }, handle)
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  state.url = `${tls === undefined ? 'http' : 'https'}://127.0.0.1:${(server.address() as AddressInfo).port}`
  state.close = async () => {
    held = null
    server.closeAllConnections()
    await new Promise<void>((resolve) => server.close(() => resolve()))
  }
  return state
}
