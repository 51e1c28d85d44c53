import { createServer as createNetServer } from 'node:net'

/**
 * An upstream that costs as little as an upstream can: no HTTP parser, one canned answer per
 * request head read (the sidecars send GETs without bodies), so the load side's core is not
 * what limits the sidecars. Counts the requests it answered.
 */
export function rawUpstream () {
  const answer = Buffer.from('HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Type: text/plain\r\nKeep-Alive: timeout=120\r\n\r\nok\n')
  const state = { answered: 0, server: null }
  state.server = createNetServer((socket) => {
    let carry = ''
    socket.on('data', (chunk) => {
      const text = carry + chunk.toString('latin1')
      let n = 0
      let at = text.indexOf('\r\n\r\n')
      let last = 0
      while (at !== -1) { n++; last = at + 4; at = text.indexOf('\r\n\r\n', last) }
      carry = text.slice(Math.max(last, text.length - 3))
      if (n === 0) return
      state.answered += n
      socket.write(n === 1 ? answer : Buffer.concat(Array(n).fill(answer)))
    })
    socket.on('error', () => {})
  })
  return state
}
