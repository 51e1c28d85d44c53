// The hand-written forwarding floor: what a Node proxy costs with nothing but forwarding —
// node:http in front, one undici Pool behind (`dispatch`, no stream.pipeline, no per-request
// Readable), hop-by-hop headers dropped, bodies streamed both ways with backpressure, a 502 when
// the upstream fails before answering, the upstream request ended when the client leaves. No
// routing, no limits, no stages, no logging: the floor Breakwater's CPU per request is held
// against (issue: within 1.10× with every stage on).
//
// Usage: node bench/proxies/node-floor.mjs <port> <upstream-url>
// or, in process: `floorHandler(upstreamUrl)` returns the server's request listener and a close().
// `floorHandler(upstreamUrl, { contractHeaders: true })` also sends the four request headers SPEC
// §3 has every proxied request carry (`x-request-id`, `x-forwarded-for`, `x-forwarded-proto`,
// `x-forwarded-host`), made as cheaply as possible: the floor of a proxy held to that contract.
import { createServer } from 'node:http'
import { Pool } from 'undici'

/** RFC 9110 §7.6.1: connection-specific fields, not forwarded. */
const HOP_BY_HOP = new Set(['connection', 'keep-alive', 'proxy-connection', 'te', 'trailer', 'transfer-encoding', 'upgrade'])

export function floorHandler (upstream, { contractHeaders = false } = {}) {
  const pool = new Pool(upstream, { connections: 256 })
  let ids = 0
  const handler = (req, res) => {
    const raw = req.rawHeaders
    const headers = []
    let host = ''
    for (let i = 0; i < raw.length; i += 2) {
      const name = raw[i].toLowerCase()
      if (contractHeaders && name === 'host') host = raw[i + 1]
      if (!HOP_BY_HOP.has(name)) headers.push(raw[i], raw[i + 1])
    }
    if (contractHeaders) {
      headers.push('x-request-id', `floor-${(ids++).toString(36)}`, 'x-forwarded-for', req.socket.remoteAddress ?? '', 'x-forwarded-proto', 'http')
      if (host !== '') headers.push('x-forwarded-host', host)
    }
    const hasBody = req.headers['content-length'] !== undefined || req.headers['transfer-encoding'] !== undefined
    pool.dispatch({ method: req.method, path: req.url, headers, body: hasBody ? req : null }, {
      // A client that leaves before its answer is complete ends the upstream request too (else
      // its paused upstream connection would wait for a 'drain' that never comes).
      onConnect (abort) { res.once('close', () => { if (!res.writableFinished) abort(new Error('client closed')) }) },
      onHeaders (status, rawHeaders, resume) {
        const out = []
        for (let i = 0; i < rawHeaders.length; i += 2) {
          const name = rawHeaders[i].toString('latin1')
          if (!HOP_BY_HOP.has(name.toLowerCase())) out.push(name, rawHeaders[i + 1].toString('latin1'))
        }
        res.writeHead(status, out)
        res.on('drain', resume)
        return true
      },
      onData (chunk) { return res.write(chunk) },
      onComplete () { res.end() },
      onError () {
        if (res.headersSent) res.destroy()
        else { res.statusCode = 502; res.end() }
      }
    })
  }
  return { handler, close: () => pool.close() }
}

if (import.meta.url === `file://${process.argv[1]}`) {
  const port = Number(process.argv[2])
  const { handler, close } = floorHandler(process.argv[3])
  const server = createServer({ noDelay: true, keepAliveTimeout: 5000 }, handler)
  server.listen(port, '127.0.0.1')
  for (const sig of ['SIGTERM', 'SIGINT']) {
    process.on(sig, () => { server.close(); server.closeAllConnections(); close().finally(() => process.exit(0)) })
  }
}
