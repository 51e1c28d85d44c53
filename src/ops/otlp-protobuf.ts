/**
 * The server span of a sampled request written as OTLP protobuf bytes when the request ends
 * (SPEC §18, `tracing.protocol: http/protobuf`), the default encoding.
 *
 * Why not OpenTelemetry's serialiser: it walks a `ReadableSpan` object per request, kept alive
 * until its batch is sent, and re-encodes every attribute key of every span. Measured per span
 * (bench/micro/tracing.mjs), that was most of what tracing every request cost. Here a span
 * costs one append to its batch's buffer: the attribute keys, the resource and the scope are
 * encoded once, and nothing per request outlives the request. The bytes are the same as
 * OpenTelemetry's `ProtobufTraceSerializer` writes for the same span, field for field (a test
 * compares them), and the batches still travel through OpenTelemetry's OTLP/HTTP transport
 * (ops/tracing.ts).
 *
 * Wire format (opentelemetry-proto, trace/v1): ExportTraceServiceRequest { 1 resource_spans:
 * ResourceSpans { 1 resource, 2 scope_spans: ScopeSpans { 1 scope, 2 spans… } } }.
 */
import type { SpanWriter } from './span-facts.js'

/** Bytes of a protobuf varint. */
function varintSize (n: number): number {
  return n < 0x80 ? 1 : n < 0x4000 ? 2 : n < 0x200000 ? 3 : n < 0x10000000 ? 4 : 5
}

/** A batch's resource before one is given (`SpanEncoder.open`, `reuse`). */
const NO_RESOURCE = Buffer.alloc(0)

/** One batch of encoded spans, room kept in front for the enclosing messages. */
export class SpanBatch {
  count = 0
  buf: Buffer
  /** Where the spans start (after the headroom) and where the next one goes. */
  readonly start: number
  pos: number
  /** The encoded resource its spans are sent with: the one in force when the batch was opened. */
  resource: Buffer = NO_RESOURCE

  constructor (headroom: number, size: number) {
    this.buf = Buffer.allocUnsafe(Math.max(size, headroom + 4096))
    this.start = headroom
    this.pos = headroom
  }

  /** Room for `n` more bytes: a batch grows by doubling, like any buffer. */
  ensure (n: number): void {
    const needed = this.pos + n
    if (needed <= this.buf.length) return
    let size = this.buf.length * 2
    while (size < needed) size *= 2
    const next = Buffer.allocUnsafe(size)
    this.buf.copy(next, 0, 0, this.pos)
    this.buf = next
  }

  byte (b: number): void {
    this.buf[this.pos++] = b
  }

  varint (n: number): void {
    const buf = this.buf
    let p = this.pos
    while (n >= 0x80) {
      buf[p++] = (n & 0x7f) | 0x80
      n = Math.floor(n / 128)
    }
    buf[p++] = n
    this.pos = p
  }

  bytes (b: Uint8Array): void {
    this.buf.set(b, this.pos)
    this.pos += b.length
  }

  /**
   * A length-delimited UTF-8 string (lone surrogates become U+FFFD, as TextEncoder writes them);
   * `n` is its UTF-8 length when the caller has it already.
   */
  string (s: string, n = utf8Length(s)): void {
    this.varint(n)
    if (n === s.length) {
      const buf = this.buf
      let p = this.pos
      for (let i = 0; i < n; i++) buf[p++] = s.charCodeAt(i)
      this.pos = p
    } else {
      this.pos += this.buf.write(s, this.pos, n, 'utf8')
    }
  }

  /** Nanoseconds since the epoch as fixed64, from fractional epoch milliseconds. */
  fixed64Nanos (ms: number): void {
    const [seconds, nanos] = hrTime(ms)
    // seconds × 1e9 + nanos exceeds 2^53: split seconds at 16 bits so each product is exact.
    const low = (seconds % 0x10000) * 1e9 + nanos
    const high = Math.floor(seconds / 0x10000) * 1e9 // × 2^16
    const sum = (high % 0x10000) * 0x10000 + low
    this.buf.writeUInt32LE(sum % 0x100000000, this.pos)
    this.buf.writeUInt32LE(Math.floor(high / 0x10000) + Math.floor(sum / 0x100000000), this.pos + 4)
    this.pos += 8
  }
}

/** UTF-8 length of `s`; its length when it is ASCII (the usual case), without a native call. */
function utf8Length (s: string): number {
  for (let i = 0; i < s.length; i++) {
    if (s.charCodeAt(i) > 0x7f) return Buffer.byteLength(s, 'utf8')
  }
  return s.length
}

/** Epoch milliseconds (fractional) as OpenTelemetry's [seconds, nanoseconds]. */
export function hrTime (ms: number): [number, number] {
  let seconds = Math.floor(ms / 1000)
  let nanos = Math.round((ms - seconds * 1000) * 1e6)
  if (nanos >= 1e9) { seconds++; nanos -= 1e9 }
  return [seconds, nanos]
}

/** A key of a KeyValue, with its tag and length: encoded once per process. */
function keyBytes (key: string): Buffer {
  return Buffer.concat([Buffer.from([0x0a, key.length]), Buffer.from(key, 'latin1')])
}

/**
 * One attribute key, encoded once, and whole attributes for values seen before. Most values
 * repeat from request to request (the method, the route, the upstream, the Host, the status,
 * the user agent of a few callers); a repeated value costs one copy. Bounded: a key keeps its
 * first `VALUES_KEPT` short values; `url.path` keeps none.
 */
class AttributeKey {
  readonly key: Buffer
  readonly values = new Map<string | number, Buffer>()
  readonly keeps: boolean

  constructor (key: string) {
    this.key = keyBytes(key)
    this.keeps = key !== 'url.path'
  }

  /** Keep the attribute just written at `at` in `batch` for its value. */
  keep (value: string | number, batch: SpanBatch, at: number): void {
    if (!this.keeps || this.values.size >= VALUES_KEPT || (typeof value === 'string' && value.length > VALUE_KEPT_LENGTH)) return
    this.values.set(value, Buffer.from(batch.buf.subarray(at, batch.pos)))
  }
}

const VALUES_KEPT = 64
const VALUE_KEPT_LENGTH = 256

/**
 * KeyValue { 1 key, 2 value: AnyValue } under field `tag`, up to the AnyValue's field tag
 * (`valueTag`); `valueLength` is what follows that tag.
 */
function keyValueHead (batch: SpanBatch, tag: number, key: Buffer, valueTag: number, valueLength: number): void {
  const any = 1 + valueLength
  const kv = key.length + 1 + varintSize(any) + any
  batch.ensure(kv + 6)
  batch.byte(tag)
  batch.varint(kv)
  batch.bytes(key)
  batch.byte(0x12)
  batch.varint(any)
  batch.byte(valueTag)
}

/** A string attribute: AnyValue field 1. */
function writeString (batch: SpanBatch, tag: number, key: Buffer, value: string): void {
  const n = utf8Length(value)
  keyValueHead(batch, tag, key, 0x0a, varintSize(n) + n)
  batch.string(value, n)
}

/** An integer attribute (non-negative here: ports and status codes): AnyValue field 3. */
function writeInt (batch: SpanBatch, tag: number, key: Buffer, value: number): void {
  keyValueHead(batch, tag, key, 0x18, varintSize(value))
  batch.varint(value)
}

const SPAN_ATTRIBUTE = 0x4a // Span field 9, length-delimited
const RESOURCE_ATTRIBUTE = 0x0a // Resource field 1
/** Span.flags: the W3C sampled flag, plus "whether the parent is remote is known" (0x100) and "it is" (0x200). */
const FLAGS_LOCAL_ROOT = 0x101
const FLAGS_REMOTE_PARENT = 0x301
/** Bytes of a span besides its name and attributes (each attribute makes its own room). */
const SPAN_FIXED = 96
/** Room kept for a span's length: two varint bytes, a span of up to 16 KiB. */
const RESERVED = 2

/** Encodes server spans into batches; one per sidecar, built when tracing loads. */
export class SpanEncoder implements SpanWriter {
  /** Resource and scope, encoded once (the resource again when `service.version` changes): the head of every request. */
  private resource: Buffer = NO_RESOURCE
  private resourceAttributes: Readonly<Record<string, string>> = {}
  private readonly scope: Buffer
  private headroom = 0
  /** The attribute keys seen so far, with the values they keep. */
  private readonly attributes = new Map<string, AttributeKey>()
  /** The batch of the open span, and where that span's tag is. */
  private batch: SpanBatch | null = null
  private spanAt = 0

  constructor (resourceAttributes: Readonly<Record<string, string>>, scope: { name: string, version: string }) {
    const s = new SpanBatch(0, 3 * (scope.name.length + scope.version.length) + 32)
    s.byte(0x0a)
    s.string(scope.name)
    s.byte(0x12)
    s.string(scope.version)
    this.scope = this.message(0x0a, s)
    this.setResource(resourceAttributes)
  }

  /**
   * The resource of the batches opened from now on (a reload that changes `version`); a batch
   * already open keeps the one its spans were written under.
   */
  setResource (resourceAttributes: Readonly<Record<string, string>>): void {
    this.resourceAttributes = resourceAttributes
    const head = new SpanBatch(0, 4096)
    for (const [key, value] of Object.entries(resourceAttributes)) writeString(head, RESOURCE_ATTRIBUTE, keyBytes(key), value)
    head.byte(0x10) // dropped_attributes_count: 0
    head.byte(0)
    this.resource = this.message(0x0a, head)
    // resource_spans tag + length, resource, scope_spans tag + length, scope
    this.headroom = 1 + 5 + this.resource.length + 1 + 5 + this.scope.length
  }

  /** `tag`, length, then what `body` holds. */
  private message (tag: number, body: SpanBatch): Buffer {
    const out = new SpanBatch(0, body.pos + 6)
    out.byte(tag)
    out.varint(body.pos)
    out.bytes(body.buf.subarray(0, body.pos))
    return Buffer.from(out.buf.subarray(0, out.pos))
  }

  /** A new empty batch of room for about `spans` spans. */
  open (spans: number): SpanBatch {
    const batch = new SpanBatch(this.headroom, this.headroom + spans * 512)
    batch.resource = this.resource
    return batch
  }

  /** `service.version` of the batches opened from now on (`setResource`). */
  setVersion (version: string): void {
    this.setResource({ ...this.resourceAttributes, 'service.version': version })
  }

  /** Make a sent batch's buffer a new empty batch; false when its headroom is too small for the resource now. */
  reuse (batch: SpanBatch): boolean {
    if (batch.start < this.headroom) return false
    batch.count = 0
    batch.pos = batch.start
    batch.resource = this.resource
    return true
  }

  /**
   * Open a span in `batch`: ids, name, kind and times. Attributes follow (`string`, `int`), then
   * `end` closes it.
   */
  begin (batch: SpanBatch, traceId: string, spanId: string, parentSpanId: string, name: string, startMs: number, endMs: number): void {
    this.batch = batch
    batch.ensure(SPAN_FIXED + 3 * name.length)
    this.spanAt = batch.pos
    batch.byte(0x12) // ScopeSpans.spans
    batch.pos += RESERVED // the span's length, written by `end`
    const buf = batch.buf
    buf[batch.pos++] = 0x0a // trace_id
    buf[batch.pos++] = 16
    batch.pos += buf.write(traceId, batch.pos, 16, 'hex')
    buf[batch.pos++] = 0x12 // span_id
    buf[batch.pos++] = 8
    batch.pos += buf.write(spanId, batch.pos, 8, 'hex')
    if (parentSpanId !== '') {
      buf[batch.pos++] = 0x22 // parent_span_id
      buf[batch.pos++] = 8
      batch.pos += buf.write(parentSpanId, batch.pos, 8, 'hex')
    }
    batch.byte(0x2a) // name
    batch.string(name)
    batch.byte(0x30) // kind: SERVER (the API's 1, plus one)
    batch.byte(2)
    batch.byte(0x39) // start_time_unix_nano
    batch.fixed64Nanos(startMs)
    batch.byte(0x41) // end_time_unix_nano
    batch.fixed64Nanos(endMs)
  }

  string (key: string, value: string): void {
    this.attribute(key, value, writeString)
  }

  int (key: string, value: number): void {
    this.attribute(key, value, writeInt)
  }

  /** One attribute: the kept encoding of a value seen before, else written (and maybe kept). */
  private attribute<V extends string | number> (key: string, value: V, write: (batch: SpanBatch, tag: number, key: Buffer, value: V) => void): void {
    const batch = this.batch as SpanBatch
    const attribute = this.key(key)
    const kept = attribute.values.get(value)
    if (kept !== undefined) {
      batch.ensure(kept.length)
      batch.bytes(kept)
      return
    }
    const at = batch.pos
    write(batch, SPAN_ATTRIBUTE, attribute.key, value)
    attribute.keep(value, batch, at)
  }

  private key (key: string): AttributeKey {
    let attribute = this.attributes.get(key)
    if (attribute === undefined) {
      attribute = new AttributeKey(key)
      this.attributes.set(key, attribute)
    }
    return attribute
  }

  /** Close the span: counts, status and flags, then its length in the room `begin` kept. */
  end (error: boolean, remoteParent: boolean): void {
    const batch = this.batch as SpanBatch
    this.batch = null
    batch.ensure(16)
    const buf = batch.buf
    buf[batch.pos++] = 0x50 // dropped_attributes_count
    buf[batch.pos++] = 0
    buf[batch.pos++] = 0x60 // dropped_events_count
    buf[batch.pos++] = 0
    buf[batch.pos++] = 0x70 // dropped_links_count
    buf[batch.pos++] = 0
    buf[batch.pos++] = 0x7a // status { 3 code }
    buf[batch.pos++] = 2
    buf[batch.pos++] = 0x18
    buf[batch.pos++] = error ? 2 : 0
    buf[batch.pos++] = 0x85 // flags: field 16, fixed32
    buf[batch.pos++] = 0x01
    buf.writeUInt32LE(remoteParent ? FLAGS_REMOTE_PARENT : FLAGS_LOCAL_ROOT, batch.pos)
    batch.pos += 4
    // The body follows the tag and the room kept for its length; a span longer than that room
    // holds (16 KiB: a very long URL or user agent) moves one byte right per extra length byte.
    const bodyAt = this.spanAt + 1 + RESERVED
    const length = batch.pos - bodyAt
    const extra = varintSize(length) - RESERVED
    if (extra > 0) {
      batch.ensure(extra)
      batch.buf.copyWithin(bodyAt + extra, bodyAt, batch.pos)
    }
    const end = batch.pos + Math.max(extra, 0)
    batch.pos = this.spanAt + 1
    batch.varint(length)
    if (extra < 0) {
      batch.buf.copyWithin(batch.pos, bodyAt, bodyAt + length)
      batch.pos += length
    } else {
      batch.pos = end
    }
    batch.count++
  }

  /** The ExportTraceServiceRequest for `batch`, written into its headroom: no copy of the spans. */
  request (batch: SpanBatch): Uint8Array {
    const resource = batch.resource
    const spans = batch.pos - batch.start
    const scopeSpans = this.scope.length + spans
    const resourceSpans = resource.length + 1 + varintSize(scopeSpans) + scopeSpans
    const head = 1 + varintSize(resourceSpans) + resource.length + 1 + varintSize(scopeSpans) + this.scope.length
    const at = batch.start - head
    const saved = batch.pos
    batch.pos = at
    batch.byte(0x0a)
    batch.varint(resourceSpans)
    batch.bytes(resource)
    batch.byte(0x12)
    batch.varint(scopeSpans)
    batch.bytes(this.scope)
    batch.pos = saved
    return batch.buf.subarray(at, saved)
  }
}

/** ExportTraceServiceResponse, as OpenTelemetry's transport reads it (`partialSuccess`). */
export interface ExportTraceServiceResponse {
  partialSuccess?: { rejectedSpans?: number, errorMessage?: string }
}

/**
 * Decode the collector's answer to an export: ExportTraceServiceResponse { 1 partial_success:
 * ExportTracePartialSuccess { 1 rejected_spans int64, 2 error_message string } }, other fields
 * skipped. What `ProtobufTraceSerializer.deserializeResponse` of @opentelemetry/otlp-transformer
 * returns, field for field (a test compares them), without loading that package: its index
 * brings every signal's serialisers, JSON and protobuf, for these two fields.
 * Throws on a truncated message or a group wire type, as it does.
 */
export function decodeExportTraceServiceResponse (data: Uint8Array): ExportTraceServiceResponse {
  const out: ExportTraceServiceResponse = {}
  const reader = new Reader(data, 0, data.length)
  while (reader.pos < reader.end) {
    const tag = reader.varint()
    if (tag === 0x0a) out.partialSuccess = decodePartialSuccess(reader.bytes())
    else reader.skip(tag & 7)
  }
  return out
}

function decodePartialSuccess (reader: Reader): NonNullable<ExportTraceServiceResponse['partialSuccess']> {
  const out: NonNullable<ExportTraceServiceResponse['partialSuccess']> = {}
  while (reader.pos < reader.end) {
    const tag = reader.varint()
    if (tag === 0x08) out.rejectedSpans = reader.varint()
    else if (tag === 0x12) out.errorMessage = reader.bytes().text()
    else reader.skip(tag & 7)
  }
  return out
}

/** A protobuf reader over `data[pos, end)`. */
class Reader {
  constructor (readonly data: Uint8Array, public pos: number, readonly end: number) {}

  /** A base-128 varint as a number (precision above 2^53 is lost, as OpenTelemetry's reader loses it). */
  varint (): number {
    let value = 0
    let scale = 1
    while (this.pos < this.end) {
      const b = this.data[this.pos++] as number
      value += (b & 0x7f) * scale
      scale *= 128
      if ((b & 0x80) === 0) return value
    }
    throw new Error('Truncated buffer: unexpected end of data while reading varint')
  }

  /** A length-delimited field, as a reader of its bytes. */
  bytes (): Reader {
    const length = this.varint()
    if (this.pos + length > this.end) throw new Error(`Truncated buffer: expected ${length} bytes at position ${this.pos}, but only ${this.end - this.pos} available`)
    const field = new Reader(this.data, this.pos, this.pos + length)
    this.pos += length
    return field
  }

  text (): string {
    return Buffer.from(this.data.buffer, this.data.byteOffset + this.pos, this.end - this.pos).toString('utf8')
  }

  skip (wireType: number): void {
    if (wireType === 0) this.varint()
    else if (wireType === 1) this.pos += 8
    else if (wireType === 2) this.bytes()
    else if (wireType === 5) this.pos += 4
    else throw new Error(`Unknown wire type ${wireType}, cannot safely skip`)
  }
}
