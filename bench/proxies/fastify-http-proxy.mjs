// Peer proxy for comparison: fastify 5 + @fastify/http-proxy, defaults except
// logger off and retries off.
// Usage: node bench/proxies/fastify-http-proxy.mjs <port> <upstream-url>
import Fastify from 'fastify'
import proxy from '@fastify/http-proxy'

const port = Number(process.argv[2])
const upstream = process.argv[3]

const app = Fastify({ logger: false })
await app.register(proxy, {
  upstream,
  // Plugin options are handed to @fastify/reply-from: an empty list turns off
  // the retry on socket hang-up and on 503 for every method.
  retryMethods: [],
  replyOptions: { retriesCount: 0 }
})
await app.listen({ host: '127.0.0.1', port })

for (const sig of ['SIGTERM', 'SIGINT']) {
  process.on(sig, () => {
    app.close().finally(() => process.exit(0))
  })
}
