// Markdown for model output, built as DOM nodes: text only ever enters the page through
// textContent, so nothing a model writes can become markup or script.
//
// render(container, text, isDraft) rebuilds container from text. Every text range keeps its
// offsets into `text`, so characters can be tinted by isDraft(i) (true when character i came
// from an accepted MTP draft) whatever Markdown structure they end up in.
//
// The subset: fenced code blocks (an unclosed fence, as while streaming, runs to the end),
// ATX headings, bullet and numbered lists, block quotes, paragraphs (single newlines kept as
// line breaks), inline code, **bold**, *italic* / _italic_, and [links](http(s)://...).
"use strict";

const PmtpMarkdown = (() => {
  function lines(text) {
    const out = [];
    let start = 0;
    while (start <= text.length) {
      let end = text.indexOf("\n", start);
      if (end < 0) end = text.length;
      out.push({ start, end, s: text.slice(start, end) });
      if (end === text.length) break;
      start = end + 1;
    }
    return out;
  }

  // Text [a, b) of the source as text nodes, draft characters wrapped in <span class="d">.
  function textRange(parent, src, a, b, isDraft) {
    let i = a;
    while (i < b) {
      const drafted = isDraft(i);
      let j = i + 1;
      while (j < b && isDraft(j) === drafted) j++;
      const piece = src.slice(i, j);
      if (drafted) {
        const span = document.createElement("span");
        span.className = "d";
        span.textContent = piece;
        parent.appendChild(span);
      } else {
        parent.appendChild(document.createTextNode(piece));
      }
      i = j;
    }
  }

  const INLINE = /`+|\*\*|__|\*|_|\[/g;

  function safeUrl(url) {
    try {
      const u = new URL(url);
      return u.protocol === "http:" || u.protocol === "https:" ? u.href : null;
    } catch (e) {
      return null;
    }
  }

  // Inline Markdown of src[a, b) into parent.
  function inline(parent, src, a, b, isDraft) {
    let pos = a;
    while (pos < b) {
      INLINE.lastIndex = pos;
      const m = INLINE.exec(src);
      if (!m || m.index >= b) break;
      const at = m.index, mark = m[0];
      let handled = false;
      if (mark[0] === "`") {
        const close = src.indexOf(mark, at + mark.length);
        if (close >= 0 && close + mark.length <= b) {
          textRange(parent, src, pos, at, isDraft);
          const code = document.createElement("code");
          textRange(code, src, at + mark.length, close, isDraft);
          parent.appendChild(code);
          pos = close + mark.length;
          handled = true;
        }
      } else if (mark === "[") {
        const close = src.indexOf("](", at + 1);
        const end = close >= 0 ? src.indexOf(")", close + 2) : -1;
        const url = end >= 0 && end < b ? safeUrl(src.slice(close + 2, end)) : null;
        if (url && close < b && src.slice(at + 1, close).indexOf("\n") < 0) {
          textRange(parent, src, pos, at, isDraft);
          const link = document.createElement("a");
          link.href = url;
          link.rel = "noopener noreferrer nofollow";
          link.target = "_blank";
          inline(link, src, at + 1, close, isDraft);
          parent.appendChild(link);
          pos = end + 1;
          handled = true;
        }
      } else {
        const close = src.indexOf(mark, at + mark.length);
        const inner = at + mark.length;
        // underscores never emphasise inside a word (snake_case, __dunder__ names)
        const wordy = (c) => c !== undefined && /[\p{L}\p{N}]/u.test(c);
        const flanked = mark[0] !== "_" || (!wordy(src[at - 1]) && !wordy(src[close + mark.length]));
        if (close > inner && close + mark.length <= b && flanked && !/\s/.test(src[inner]) && !/\s/.test(src[close - 1])) {
          textRange(parent, src, pos, at, isDraft);
          const el = document.createElement(mark.length === 2 ? "strong" : "em");
          inline(el, src, inner, close, isDraft);
          parent.appendChild(el);
          pos = close + mark.length;
          handled = true;
        }
      }
      if (!handled) {
        textRange(parent, src, pos, at + mark.length, isDraft);
        pos = at + mark.length;
      }
    }
    textRange(parent, src, pos, b, isDraft);
  }

  const FENCE = /^\s{0,3}(```+|~~~+)\s*([\w+#.-]*)/;
  const HEADING = /^\s{0,3}(#{1,6})\s+/;
  const BULLET = /^(\s*)([-*+])\s+/;
  const NUMBERED = /^(\s*)(\d{1,9})[.)]\s+/;
  const QUOTE = /^\s{0,3}>\s?/;

  function render(container, text, isDraft) {
    container.textContent = "";
    const ls = lines(text);
    let i = 0;
    let para = null, list = null, listKind = null, quote = null;
    const closeBlocks = () => { para = null; list = null; listKind = null; quote = null; };
    while (i < ls.length) {
      const line = ls[i];
      const fence = FENCE.exec(line.s);
      if (fence) {
        closeBlocks();
        const pre = document.createElement("pre");
        const code = document.createElement("code");
        if (fence[2]) pre.dataset.lang = fence[2];
        let j = i + 1;
        const first = j < ls.length ? ls[j].start : text.length;
        let last = first;
        while (j < ls.length && !ls[j].s.trimStart().startsWith(fence[1])) {
          last = ls[j].end;
          j++;
        }
        textRange(code, text, first, Math.max(first, last), isDraft);
        pre.appendChild(code);
        container.appendChild(pre);
        i = j + 1;
        continue;
      }
      if (line.s.trim() === "") {
        closeBlocks();
        i++;
        continue;
      }
      const heading = HEADING.exec(line.s);
      if (heading) {
        closeBlocks();
        const h = document.createElement("h" + Math.min(6, heading[1].length + 2));
        inline(h, text, line.start + heading[0].length, line.end, isDraft);
        container.appendChild(h);
        i++;
        continue;
      }
      const bullet = BULLET.exec(line.s), numbered = NUMBERED.exec(line.s);
      const item = bullet || numbered;
      if (item) {
        const kind = bullet ? "ul" : "ol";
        if (!list || listKind !== kind) {
          closeBlocks();
          list = document.createElement(kind);
          if (numbered && numbered[2] !== "1") list.start = parseInt(numbered[2], 10);
          listKind = kind;
          container.appendChild(list);
        }
        const li = document.createElement("li");
        inline(li, text, line.start + item[0].length, line.end, isDraft);
        list.appendChild(li);
        para = null;
        i++;
        continue;
      }
      const q = QUOTE.exec(line.s);
      if (q) {
        if (!quote) {
          closeBlocks();
          quote = document.createElement("blockquote");
          container.appendChild(quote);
        } else {
          quote.appendChild(document.createElement("br"));
        }
        inline(quote, text, line.start + q[0].length, line.end, isDraft);
        i++;
        continue;
      }
      if (list && /^\s+/.test(line.s)) {   // a continuation line of the last list item
        const li = list.lastChild;
        li.appendChild(document.createElement("br"));
        inline(li, text, line.start, line.end, isDraft);
        i++;
        continue;
      }
      if (!para) {
        closeBlocks();
        para = document.createElement("p");
        container.appendChild(para);
      } else {
        para.appendChild(document.createElement("br"));
      }
      inline(para, text, line.start, line.end, isDraft);
      i++;
    }
  }

  return { render };
})();
