// Declarations of the undici files `undici.ts` loads directly; undici ships types for its
// index only. Each file's `module.exports` is what the index exports under that name.
declare module 'undici/lib/dispatcher/dispatcher.js' {
  import { Dispatcher } from 'undici'
  export default Dispatcher
}
declare module 'undici/lib/dispatcher/client.js' {
  import { Client } from 'undici'
  export default Client
}
declare module 'undici/lib/dispatcher/pool.js' {
  import { Pool } from 'undici'
  export default Pool
}
declare module 'undici/lib/dispatcher/agent.js' {
  import { Agent } from 'undici'
  export default Agent
}
declare module 'undici/lib/core/connect.js' {
  import { buildConnector } from 'undici'
  export default buildConnector
}
declare module 'undici/lib/api/index.js' {
  const api: Record<'request' | 'stream' | 'pipeline' | 'upgrade' | 'connect', (...args: unknown[]) => unknown>
  export default api
}
declare module 'undici/lib/global.js' {
  import { getGlobalDispatcher } from 'undici'
  const global: { getGlobalDispatcher: typeof getGlobalDispatcher }
  export default global
}
declare module 'undici/lib/core/util.js' {
  const util: { parseURL: (url: string | URL) => URL }
  export default util
}
