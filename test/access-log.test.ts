import t from 'tap'
import { Writable } from 'node:stream'
import { createLogger } from '../src/log/logger.js'
import { jsonString, jsonMillis, JsonMembers, RawLines } from '../src/log/lines.js'
import { startUpstream, echo } from './helpers/upstream.js'
import { startTestSidecar } from './helpers/sidecar.js'
import { send, raw, eventually } from './helpers/http.js'

type Line = Record<string, unknown>

const isAccess = (l: Line): boolean => l.msg === 'request'

/** A destination that keeps every write as written. */
function capture (): { dest: Writable, writes: string[] } {
  const writes: string[] = []
  const dest = new Writable({
    decodeStrings: false,
    write (chunk: string | Buffer, _enc, cb) { writes.push(chunk.toString()); cb() }
  })
  return { dest, writes }
}

t.test('jsonString escapes exactly as JSON.stringify does, for every UTF-16 code unit', async (t) => {
  let wrong = 0
  for (let c = 0; c < 0x10000; c++) {
    const s = `a${String.fromCharCode(c)}b`
    if (jsonString(s) !== JSON.stringify(s)) {
      wrong++
      if (wrong <= 3) t.fail(`code unit ${c.toString(16)}: ${jsonString(s)} vs ${JSON.stringify(s)}`)
    }
  }
  t.equal(wrong, 0, 'no code unit escaped differently')
  for (const s of ['', '/', '"},{"x":1', '\\', '\n{"msg":"request"}', '\u2028\u2029', '😀', '\ud800x', 'x\udc00', 'ÿ\u0080']) {
    // Named in ASCII: U+2028 in an assertion's name would end TAP's line.
    const name = s.replace(/[^\x20-\x7e]/g, (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, '0')}`).padEnd(1, '-')
    t.equal(jsonString(s), JSON.stringify(s), name)
    t.equal(JSON.parse(jsonString(s)), s, `${name} reads back`)
  }
})

t.test('JsonMembers gives each value\'s member as JSON.stringify writes it, repeated, alternating and past its memory', async (t) => {
  const members = new JsonMembers('user_agent.original')
  const values: string[] = []
  for (let i = 0; i < 2000; i++) values.push(`agent-${i % 700}`, 'curl/8.0', 'curl/8.0', `"quoted" \\ ${i % 3}\n`, '\ud800', 'ÿé😀', `${'u'.repeat(300 + (i % 2))}"`)
  let wrong = 0
  for (const value of values) {
    const member = members.of(value)
    if (member !== `,"user_agent.original":${JSON.stringify(value)}`) {
      wrong++
      if (wrong <= 3) t.fail(`${JSON.stringify(value)}: ${member}`)
    }
  }
  t.equal(wrong, 0, `${values.length} members, each the value's own`)
  t.same(JSON.parse(`{"a":1${members.of('x"y')}}`), { a: 1, 'user_agent.original': 'x"y' }, 'a member reads back')
})

t.test('jsonMillis writes whole microseconds as milliseconds exactly as String(µs / 1000) does', async (t) => {
  let wrong = 0
  const check = (micros: number): void => {
    if (jsonMillis(micros) !== JSON.stringify(micros / 1000)) {
      wrong++
      if (wrong <= 3) t.fail(`${micros}: ${jsonMillis(micros)} vs ${JSON.stringify(micros / 1000)}`)
    }
  }
  for (let us = 0; us < 300_000; us++) check(us)
  let x = 1
  for (let i = 0; i < 200_000; i++) {
    x = (x * 48271) % 2147483647
    check(x * 465 + (i % 1000)) // up to about 1e12 µs: 11 days
  }
  for (const us of [999_999_999_999_999, 1e15, 2 ** 53 + 2, -1, 1.5, NaN, Infinity]) check(us)
  t.equal(wrong, 0, 'the same text for every value')
})

t.test('the time field is toISOString\'s, across second, minute, day and year boundaries', async (t) => {
  const { dest } = capture()
  const { logger } = createLogger('info', 'svc', dest)
  const lines = new RawLines(logger, (line) => { dest.write(line) }, { service: 'svc' })
  let wrong = 0
  const starts = [Date.UTC(2026, 11, 3, 7, 59, 59, 990), Date.UTC(2026, 11, 31, 23, 59, 59, 995), 0, Date.UTC(2024, 1, 28, 23, 59, 58, 0)]
  for (const start of starts) {
    for (let ms = start; ms < start + 2100; ms += 1) {
      if (lines.isoTime(ms) !== new Date(ms).toISOString()) wrong++
    }
    // Going back in time (a clock step) is not a cache hit.
    for (const ms of [start + 5000, start, start + 999, start - 1]) {
      if (lines.isoTime(ms) !== new Date(ms).toISOString()) wrong++
    }
  }
  t.equal(wrong, 0, 'every millisecond formats as toISOString does')
})

t.test('a raw line has the shape of pino\'s lines and keeps its place among them', async (t) => {
  const { dest, writes } = capture()
  const { logger, lines } = createLogger('info', 'svc "x"', dest)
  logger.info({ a: 'x"y', n: 1.5, none: undefined }, 'request')
  lines.write('info', `,"a":${jsonString('x"y')},"n":1.5`, 'request')
  logger.warn({ event: 'between' }, 'pino line')
  lines.write('warn', ',"b":true', 'request')
  logger.info('last')
  t.equal(writes.length, 5, 'five writes')
  const noTime = (s: string): string => s.replace(/"time":"[^"]*"/, '"time":T')
  t.equal(noTime(writes[1] as string), noTime(writes[0] as string), 'the same bytes as pino writes for the same fields, apart from the time')
  t.match(writes[1], /^\{"level":"info","time":"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z","service":"svc \\"x\\"","a":"x\\"y","n":1\.5,"msg":"request"\}\n$/, 'level, time, service, fields, msg')
  t.same(writes.map((w) => (JSON.parse(w) as Line).msg), ['request', 'request', 'pino line', 'request', 'last'], 'in the order written')
  t.equal((JSON.parse(writes[3] as string) as Line).level, 'warn', 'warn level')

  logger.level = 'warn'
  t.notOk(lines.enabled('info'), 'info is off at level warn')
  t.ok(lines.enabled('warn'), 'warn is on at level warn')
  logger.level = 'error'
  t.notOk(lines.enabled('warn'), 'warn is off at level error')
})

t.test('hostile characters in the path, user agent, host and request id give one JSON line with the exact values', async (t) => {
  const up = await startUpstream(echo)
  t.teardown(up.close)
  const { proxy, proxyPort, logs } = await startTestSidecar(t, {
    upstreams: { app: { url: up.url } },
    routes: [{ name: 'all', match: { pathPrefix: '/' }, upstream: 'app' }]
  })
  // Bytes Node's parser lets through: quotes and braces in the path, a backslash (refused,
  // 400, logged as received), tab, quotes, backslashes and latin-1 bytes in header values; a
  // Host with a quote and a backslash (refused too: not a host, but logged as received).
  const agent = 'evil"},"requestId":"forged","x":"\\\t\xff\x80{'
  const cases = [
    { id: 'hostile-1"},{"msg":"request', target: '/a"b/{c}/"},"url.path":"/forged?q="x"', path: '/a"b/{c}/"},"url.path":"/forged', host: "h.o-s_t~!$&'()*+,;=", status: 200 },
    { id: 'hostile-2\\', target: '/a\\"b\\', path: '/a\\"b\\', host: 'h"ost\\', status: 400 }
  ]
  for (const c of cases) {
    const request = `GET ${c.target} HTTP/1.1\r\nHost: ${c.host}\r\nUser-Agent: ${agent}\r\nX-Request-Id: ${c.id}\r\nConnection: close\r\n\r\n`
    const reply = await raw(proxyPort, Buffer.from(request, 'latin1'))
    t.match(reply, new RegExp(`^HTTP/1.1 ${c.status} `), `${c.status} for ${JSON.stringify(c.target)}`)
  }
  // A plain request after them: its line must still be its own.
  t.equal((await send(proxy, '/plain', { headers: { 'x-request-id': 'plain' } })).status, 200, 'a plain request')
  t.ok(await eventually(() => logs.filter(isAccess).length >= 3), 'three access lines')
  const access = logs.filter(isAccess)
  t.equal(access.length, 3, 'one line per request, none injected')
  for (const [i, c] of cases.entries()) {
    const line = access[i] as Line
    t.equal(line.requestId, c.id, `request id ${JSON.stringify(c.id)}`)
    t.equal(line['url.path'], c.path, `url.path ${JSON.stringify(c.path)}`)
    t.equal(line['user_agent.original'], agent, 'user_agent.original, byte for byte')
    t.equal(line['server.address'], c.host, 'server.address')
    t.equal(line['http.response.status_code'], c.status, 'status')
    t.notOk('x' in line, 'no field injected')
  }
  t.equal((access[1] as Line)['error.type'], 'bad_request', 'the refused one has its error.type')
  t.equal((access[2] as Line).requestId, 'plain', 'the plain line is whole')
})

t.test('level warn: successes are not logged, 5xx are, at warn', async (t) => {
  const up = await startUpstream((req, res) => { res.statusCode = req.url === '/fail' ? 503 : 200; res.end() })
  t.teardown(up.close)
  const { proxy, logs } = await startTestSidecar(t, {
    upstreams: { app: { url: up.url } },
    routes: [{ match: { pathPrefix: '/' }, upstream: 'app' }],
    logging: { level: 'warn', accessLog: true }
  })
  t.equal((await send(proxy, '/ok', { headers: { 'x-request-id': 'ok' } })).status, 200, 'ok')
  t.equal((await send(proxy, '/fail', { headers: { 'x-request-id': 'fail' } })).status, 503, 'upstream 503')
  t.ok(await eventually(() => logs.some(isAccess)), 'a line')
  t.equal((await send(proxy, '/ok', { headers: { 'x-request-id': 'ok2' } })).status, 200, 'ok again')
  t.ok(await eventually(() => logs.some((l) => l.msg === 'request' && l.requestId === 'fail')), 'the 503 is logged')
  t.same(logs.filter(isAccess).map((l) => [l.requestId, l.level]), [['fail', 'warn']], 'only the 5xx, at warn')
})
