import { ChangeConsumer } from './test/support/cdc-consumer.ts';
const c = new ChangeConsumer('127.0.0.1:25592', 'http://127.0.0.1:25581', (m) => console.log(m.offset, JSON.stringify(m.key, (k, v) => typeof v === 'bigint' ? `${v}n` : v), JSON.stringify(m.value?.after ?? m.value, (k, v) => typeof v === 'bigint' ? `${v}n` : v)));
await c.follow([process.argv[2]]);
setTimeout(async () => { await c.stop(); process.exit(0); }, Number(process.argv[3] ?? 8000));
