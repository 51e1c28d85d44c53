// Fallback upstream when nginx is not installed: answers "ok\n" on every path.
// Usage: node bench/upstream.mjs <port>
import { createServer } from 'node:http'

const port = Number(process.argv[2] ?? process.env.PORT ?? 18080)
const body = Buffer.from('ok\n')

const server = createServer((req, res) => {
  res.writeHead(200, { 'content-type': 'text/plain', 'content-length': body.length })
  res.end(body)
})
server.keepAliveTimeout = 120_000
server.headersTimeout = 125_000
server.requestTimeout = 0
server.maxRequestsPerSocket = 0
server.listen(port, '127.0.0.1')

for (const sig of ['SIGTERM', 'SIGINT']) process.on(sig, () => process.exit(0))
