/**
 * undici, the parts Breakwater calls: `Client`, `Pool`, `Agent`, `buildConnector` and
 * `request`. undici's index also loads fetch, WebSocket, EventSource, the mock agents, the
 * interceptors and the cache stores, which Breakwater never calls. In the bundle they are
 * about 230 KB of code, and loading them costs every sidecar several MiB of resident memory
 * (bench/README.md, 2026-12-06). The modules are taken from undici's own files, so
 * nothing of that code runs. Types are undici's own: a type-only import of 'undici' loads
 * nothing.
 */
import type * as undici from 'undici'
import Dispatcher from 'undici/lib/dispatcher/dispatcher.js'
import api from 'undici/lib/api/index.js'
import globalDispatcher from 'undici/lib/global.js'
import util from 'undici/lib/core/util.js'

export { default as Client } from 'undici/lib/dispatcher/client.js'
export { default as Pool } from 'undici/lib/dispatcher/pool.js'
export { default as Agent } from 'undici/lib/dispatcher/agent.js'
export { default as buildConnector } from 'undici/lib/core/connect.js'

// What undici's index does on load: every dispatcher gets `request`, `stream`, `pipeline`,
// `upgrade` and `connect`.
Object.assign(Dispatcher.prototype, api)

/**
 * undici's `request(url, options)`: the request on `options.dispatcher`, or on the process's
 * global dispatcher (an `Agent`, shared with Node's fetch), as undici's own does.
 */
export const request = ((url: string | URL, options: Parameters<typeof undici.request>[1] = {}) => {
  const target = util.parseURL(url)
  const { dispatcher = globalDispatcher.getGlobalDispatcher(), ...rest } = options as { dispatcher?: undici.Dispatcher } & undici.Dispatcher.RequestOptions
  return dispatcher.request({
    ...rest,
    origin: target.origin,
    path: `${target.pathname}${target.search}`,
    // As undici's: an empty method or body counts as none.
    method: rest.method || (rest.body ? 'PUT' : 'GET')
  })
}) as typeof undici.request
