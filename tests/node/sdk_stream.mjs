// Streams one answer through the relay with the official openai npm SDK; prints {text, chunks}.
// Usage: node sdk_stream.mjs <baseURL> <model>
import OpenAI from "openai";

const [baseURL, model] = process.argv.slice(2);
const client = new OpenAI({ baseURL, apiKey: "caller-key", maxRetries: 0 });
const stream = await client.chat.completions.create({
  model,
  messages: [{ role: "user", content: "hi" }],
  stream: true,
});
let text = "";
let chunks = 0;
for await (const part of stream) {
  chunks += 1;
  text += part.choices[0]?.delta?.content ?? "";
}
console.log(JSON.stringify({ text, chunks }));
